/*
 * The source side of a migration: pre-copy, switchover and handoff.
 *
 * Thread: one per migration, started by vmig_migrate_src_start() and
 * joined by vmig_migrate_src_finish(); it alone touches the transport,
 * the stream writer/reader and the dirty log.  The VMM's main thread reads
 * a snapshot of the stats under m->lock and may set m->cancel.
 *
 * Pre-copy: iteration 1 sends every page (zero pages as a descriptor
 * only); each later iteration sends the pages the dirty log reported since
 * the previous sync.  In bitmap-clear mode a page's tracking is re-armed
 * (vmig_dirtylog_clear) before the page is read, so a write that races
 * with the send is reported again; the destination applies pages in stream
 * order, so the later copy wins.
 *
 * Switchover when the expected downtime fits the limit: pages still dirty
 * x bytes per page at the measured bandwidth, plus the fixed cost of the
 * handoff (twice the round trip measured when connecting, the state at the
 * measured bandwidth, and pausing).  Then: pause, final sync, last pages,
 * state, SWITCHOVER.
 *
 * Handoff (exactly one copy runs): the destination loads everything and
 * answers READY or NACK.  Before COMMIT is written every failure resumes
 * the VM here.  Once COMMIT may have reached the wire, this side never
 * resumes on its own: without RUNNING the status is handoff-uncertain
 * and the VM stays paused for the admin.
 */
#include "config.h"

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "vmig/dirtylog.h"
#include "vmig/stream.h"
#include "vmig/transport.h"
#include "vmig/vm.h"
#include "migrate-internal.h"

#define PAGE_SIZE           4096u
#define CONNECT_TIMEOUT_MS  10000
#define IO_TIMEOUT_MS       30000     /* a peer silent this long is dead */
#define REPLY_TIMEOUT_MS    60000     /* destination loading state */
#define PROGRESS_NS         250000000ull
#define MIN_ITERATION_NS    5000000ull
#define EST_STATE_PER_VCPU  (16u << 10)

/* --bandwidth pacing of one sender (writer). */
struct pacer {
	uint64_t seen, t0, b0;            /* the limit paced against, since when */
};

/*
 * An extra channel (--channels): its own connection, writer and thread.
 * The migration thread hands it an iteration (work_iter); it sends the
 * dirty pages of its stripes, then ITER_END, and reports done_iter.
 */
struct src_channel {
	struct vmig_migration *m;
	unsigned int index;
	struct vmig_transport *t;
	struct vmig_stream_writer *w;
	struct pacer pace;
	pthread_t thread;
	bool started;
	/* Under m->lock. */
	uint64_t work_iter, done_iter, sent;
	bool last;                        /* the final pass: END after it */
	struct vmig_stream_stats ws;      /* the writer's, as of done_iter */
	int error;
	struct vmig_err err;
};

struct vmig_migration {
	struct vmig_vm *vm;
	struct vmig_migrate_params p;
	char *uri;
	pthread_t thread;
	bool thread_started;
	int event_fd;
	atomic_bool cancel;

	pthread_mutex_t lock;
	struct vmig_migrate_stats stats;   /* under lock */

	/* Migration thread only. */
	struct vmig_err err;
	struct vmig_transport *t;
	struct vmig_stream_writer *w;
	struct vmig_stream_reader *r;
	struct vmig_dirtylog *dl;
	struct vmig_bitmap dirty;
	uint64_t nr_pages;
	uint64_t start_ns, last_progress_ns, pause_ns;
	uint64_t rtt_ns;
	uint64_t bytes_per_page;  /* on the wire, measured last iteration */
	bool is_file;
	char *file_path;          /* save: the file asked for */
	char *tmp_path;           /* save: written here, renamed on success */
	bool was_running;
	bool paused_here;        /* we paused the VM */
	bool committed;          /* COMMIT may be on the wire */
	bool reply_header_read;  /* the reverse stream's header */
	uint64_t acked_iter;     /* last ITER_DONE from the destination */
	uint64_t acked_ns;       /* when it arrived */
	bool acks_seen;          /* the destination sends ITER_DONE at all */
	struct {
		uint64_t first_page, nr_pages;
		uint64_t gpa;
		uint8_t *hva;
	} regions[VMIG_VM_MAX_REGIONS];
	unsigned int nr_regions;
	struct vmig_stream_extent *extents;  /* what pass 1 sends, for EXTENTS */
	uint32_t nr_extents;
	/* --bandwidth: any thread sets bw_limit. */
	_Atomic uint64_t bw_limit;
	struct pacer pace;                /* the migration thread's writer */
	/* --channels: [0] unused (the migration thread's own connection). */
	struct src_channel ch[VMIG_MIGRATE_MAX_CHANNELS];
	unsigned int nr_ch;               /* channels in all, 1.. */
	uint64_t session;
	pthread_cond_t ch_cond;           /* with lock: work given, work done */
	bool ch_quit;                     /* under lock */
	atomic_bool ch_abort;             /* a sender failed: the others stop */
	/* rdma://: pages written straight into the destination's RAM. */
	bool direct;
	uint64_t direct_pages, direct_bytes;
	/* Auto-converge. */
	unsigned int throttle;            /* % we set on the VM */
	unsigned int hot_iters;           /* passes in a row dirtying too fast */
};

const char *vmig_migrate_status_name(enum vmig_migrate_status s)
{
	switch (s) {
	case VMIG_MIGRATE_SETUP:      return "setup";
	case VMIG_MIGRATE_ACTIVE:     return "active";
	case VMIG_MIGRATE_SWITCHOVER: return "switchover";
	case VMIG_MIGRATE_COMPLETED:  return "completed";
	case VMIG_MIGRATE_CANCELLED:  return "cancelled";
	case VMIG_MIGRATE_FAILED:     return "failed";
	case VMIG_MIGRATE_UNCERTAIN:  return "handoff-uncertain";
	}
	return "unknown";
}

bool vmig_migrate_status_final(enum vmig_migrate_status s)
{
	return s >= VMIG_MIGRATE_COMPLETED;
}

struct json_object *vmig_migrate_stats_json(const struct vmig_migrate_stats *s)
{
	struct json_object *o = json_object_new_object(), *pages;

#define U64(k, v) json_object_object_add(o, k, json_object_new_uint64(v))
	json_object_object_add(o, "status", json_object_new_string(vmig_migrate_status_name(s->status)));
	U64("iteration", s->iteration);
	U64("iterations", s->iteration);
	U64("total_time_ms", s->total_ms);
	U64("downtime_ms", s->downtime_ms);
	U64("transferred_bytes", s->transferred_bytes);
	U64("ram_total_bytes", s->ram_total_bytes);
	U64("remaining_bytes", s->remaining_bytes);
	U64("dirty_pages", s->dirty_pages);
	U64("dirty_rate_pps", s->dirty_rate_pps);
	U64("bandwidth_bps", s->bandwidth_bps);
	U64("expected_downtime_ms", s->expected_downtime_ms);
	U64("eta_ms", s->eta_ms);
	U64("state_bytes", s->state_bytes);
	U64("throttle_pct", s->throttle_pct);
	U64("bandwidth_limit_bps", s->bandwidth_limit_bps);
	U64("channels", s->channels);
	U64("stream_version", s->stream_version);
#undef U64
	pages = json_object_new_object();
	json_object_object_add(pages, "zero", json_object_new_uint64(s->pages_zero));
	json_object_object_add(pages, "raw", json_object_new_uint64(s->pages_raw));
	json_object_object_add(pages, "lz4", json_object_new_uint64(s->pages_lz4));
	json_object_object_add(o, "pages", pages);
	if (s->error[0])
		json_object_object_add(o, "error", json_object_new_string(s->error));
	return o;
}

static void total_stats(struct vmig_migration *m, struct vmig_stream_stats *out);

static void notify(struct vmig_migration *m)
{
	uint64_t one = 1;

	if (write(m->event_fd, &one, sizeof(one)) < 0)
		vmig_log(VMIG_LOG_DEBUG, "migration eventfd: %s", strerror(errno));
}

/* Refresh the byte and page counters from the writer; publish. */
static void publish(struct vmig_migration *m, enum vmig_migrate_status status)
{
	struct vmig_stream_stats ws = { 0 };
	uint64_t now = vmig__now_ns();

	pthread_mutex_lock(&m->lock);
	m->stats.status = status;
	m->stats.total_ms = (now - m->start_ns) / 1000000;
	if (m->w) {
		total_stats(m, &ws);
		m->stats.transferred_bytes = ws.bytes;
		m->stats.pages_zero = ws.pages_zero;
		m->stats.pages_raw = ws.pages_raw;
		m->stats.pages_lz4 = ws.pages_lz4;
	}
	pthread_mutex_unlock(&m->lock);
	m->last_progress_ns = now;
	notify(m);
}

static bool cancelled(struct vmig_migration *m)
{
	if (!atomic_load(&m->cancel))
		return false;
	vmig_err_set(&m->err, -ECANCELED, "cancelled on request");
	return true;
}

/* The next record the destination sent (its stream header first). */
static int read_reverse(struct vmig_migration *m, struct vmig_record *rec)
{
	int ret;

	if (!m->reply_header_read) {
		ret = vmig_stream_read_header(m->r, &m->err);
		if (ret)
			return ret;
		m->reply_header_read = true;
	}
	return vmig_stream_read_record(m->r, rec, &m->err);
}

/* ITER_DONE: the destination has applied iteration N. */
static int take_ack(struct vmig_migration *m, const struct vmig_record *rec)
{
	uint64_t iter;

	memcpy(&iter, rec->body, sizeof(iter));
	iter = le64toh(iter);
	if (iter > m->stats.iteration + 1) {
		vmig_err_set(&m->err, -EPROTO, "the destination acknowledged iteration %" PRIu64
			     " before it was sent", iter);
		return -EPROTO;
	}
	m->acked_iter = iter;
	m->acked_ns = vmig__now_ns();
	m->acks_seen = true;
	return 0;
}

/* A reverse record before the switchover: ITER_DONE, or a NACK. */
static int take_early(struct vmig_migration *m, const struct vmig_record *rec)
{
	char msg[512];
	int e;

	if (rec->type == VMIG_REC_ITER_DONE)
		return take_ack(m, rec);
	if (rec->type == VMIG_REC_NACK &&
	    vmig_stream_parse_error(rec, &e, msg, sizeof(msg), &m->err) == 0) {
		/* vmig 0.1.0 from before LIVE_PAGES: say what to do. */
		vmig_err_set(&m->err, e ? e : -EPROTO, "the destination refused: %s%s", msg,
			     strstr(msg, "stream version 2 is not supported") ?
			     " (its vmig is older: upgrade it, or migrate with --stream-version 1)" :
			     "");
		return e ? e : -EPROTO;
	}
	vmig_err_set(&m->err, -EPROTO, "the destination sent %s before the switchover",
		     vmig_stream_rec_name(rec->type) ? vmig_stream_rec_name(rec->type) : "a record");
	return -EPROTO;
}

/* Take whatever the destination has sent so far, without blocking. */
static int check_peer(struct vmig_migration *m)
{
	struct pollfd pfd;
	struct vmig_record rec;
	int ret;

	if (!m->r || vmig_transport_fd(m->t) < 0)
		return 0;
	pfd = (struct pollfd){ .fd = vmig_transport_fd(m->t), .events = POLLIN };
	while (vmig_stream_reader_buffered(m->r) || poll(&pfd, 1, 0) > 0) {
		if (!m->reply_header_read) {
			/* The destination sends its stream header first. */
			ret = vmig_stream_read_header(m->r, &m->err);
			if (ret)
				return ret;
			m->reply_header_read = true;
			continue;
		}
		ret = read_reverse(m, &rec);
		if (!ret)
			ret = take_early(m, &rec);
		if (ret)
			return ret;
	}
	return 0;
}

/*
 * Wait until the destination has applied iteration @iter (ITER_DONE),
 * so that the switchover does not start with a backlog on the wire or in
 * the receiver.  A destination that does not answer within the I/O
 * timeout is taken for dead.
 */
static int wait_ack(struct vmig_migration *m, uint64_t iter)
{
	uint64_t deadline = vmig__now_ns() + (uint64_t)IO_TIMEOUT_MS * 1000000ull;
	struct vmig_record rec;
	int ret;

	for (;;) {
		ret = check_peer(m);
		if (ret)
			return ret;
		if (m->acked_iter >= iter)
			return 0;
		if (cancelled(m))
			return -ECANCELED;
		if (vmig__now_ns() > deadline) {
			vmig_err_set(&m->err, -ETIMEDOUT, "the destination has not applied "
				     "iteration %" PRIu64 " after %d s", iter, IO_TIMEOUT_MS / 1000);
			return -ETIMEDOUT;
		}
		/* Block briefly for the next reverse record. */
		{
			struct pollfd pfd = { .fd = vmig_transport_fd(m->t), .events = POLLIN };

			if (pfd.fd < 0)
				return 0;
			poll(&pfd, 1, 50);
		}
		(void)rec;
	}
}

/*
 * A write failed: a destination that refused (NACK) and hung up has said
 * why, and that reason, not "connection reset", is the one to report.
 */
static void peer_reason(struct vmig_migration *m)
{
	if (!m->err.code && m->r && !m->committed)
		check_peer(m);
}

static int writer_error(struct vmig_migration *m, int ret)
{
	const struct vmig_err *we = vmig_stream_writer_err(m->w);

	peer_reason(m);
	if (we && we->code)
		vmig_err_set(&m->err, we->code, "%s", we->msg);
	else
		vmig_err_set(&m->err, ret, "writing the stream to %s: %s", m->uri, strerror(-ret));
	return ret;
}

static uint64_t writer_bytes(struct vmig_stream_writer *w)
{
	struct vmig_stream_stats ws;

	vmig_stream_writer_stats(w, &ws);
	return ws.bytes + ws.pending;
}

/* Restart a --bandwidth pacing window (each pass, and on a new limit). */
static void pace_reset(struct vmig_migration *m, struct pacer *pc, struct vmig_stream_writer *w)
{
	pc->t0 = vmig__now_ns();
	pc->b0 = writer_bytes(w);
	pc->seen = atomic_load(&m->bw_limit);
}

/*
 * --bandwidth: sleep until the bytes @w produced since the window began
 * are due at the sender's share of the limit (channels split it evenly).
 * The final pass (VM paused) is never held back: there the guest is down
 * and the fastest copy is the shortest downtime.
 */
static int pace(struct vmig_migration *m, struct pacer *pc, struct vmig_stream_writer *w)
{
	uint64_t limit = atomic_load(&m->bw_limit), now, due, share;

	if (!limit || m->paused_here)
		return 0;
	if (limit != pc->seen) {
		pace_reset(m, pc, w);
		return 0;
	}
	share = limit / m->nr_ch ? limit / m->nr_ch : 1;
	due = pc->t0 + (uint64_t)((double)(writer_bytes(w) - pc->b0) * 1e9 / (double)share);
	while ((now = vmig__now_ns()) < due) {
		uint64_t ns = due - now > 50000000ull ? 50000000ull : due - now;
		struct timespec ts = { 0, (long)ns };

		nanosleep(&ts, NULL);
		if (atomic_load(&m->cancel))
			return -ECANCELED;
		if (atomic_load(&m->bw_limit) != limit)
			return 0;               /* changed: the next call restarts */
	}
	return 0;
}

/* A direct (RDMA WRITE) placement failed: the transport has the reason. */
static int direct_error(struct vmig_migration *m, int ret)
{
	const struct vmig_err *te = vmig_transport_err(m->t);

	peer_reason(m);
	if (te && te->code)
		vmig_err_set(&m->err, te->code, "%s", te->msg);
	else
		vmig_err_set(&m->err, ret, "writing guest memory to %s: %s", m->uri,
			     strerror(-ret));
	return ret;
}

/*
 * rdma://, before ITER_END and the state: every page written must have
 * landed, so that the destination's ITER_DONE and READY cover them.
 */
static int direct_fence(struct vmig_migration *m)
{
	int ret;

	if (!m->direct)
		return 0;
	ret = vmig_transport_mem_fence(m->t);
	return ret ? direct_error(m, ret) : 0;
}

/*
 * Send every page set in m->dirty, clearing the bits.  bitmap-clear:
 * re-arm each 64-page word's tracking before reading its pages.
 */
static int send_dirty(struct vmig_migration *m, uint64_t *sent)
{
	enum vmig_compress mode = m->p.compress;
	unsigned int ri;
	uint64_t n = 0, batches = 0;
	int ret;

	for (ri = 0; ri < m->nr_regions; ri++) {
		uint64_t first = m->regions[ri].first_page, end = first + m->regions[ri].nr_pages;
		uint64_t page = vmig_bitmap_next_set(&m->dirty, first);

		while (page < end) {
			uint64_t word_start = page & ~63ull, word_end = word_start + 64, p;

			if (word_start < first)
				word_start = first;
			if (word_end > end)
				word_end = end;
			ret = vmig_dirtylog_clear(m->dl, word_start, word_end - word_start, &m->err);
			if (ret)
				return ret;
			for (p = page; p < word_end; p++) {
				if (!vmig_bitmap_test(&m->dirty, p))
					continue;
				vmig_bitmap_clear(&m->dirty, p);
				if (m->direct) {
					/* Into the destination's RAM; zero pages too: a
					 * page may have become zero since it was sent. */
					ret = vmig_transport_write_mem(m->t, m->regions[ri].gpa +
								       (p - first) * PAGE_SIZE,
								       m->regions[ri].hva +
								       (p - first) * PAGE_SIZE,
								       PAGE_SIZE);
					if (ret)
						return direct_error(m, ret);
					m->direct_pages++;
					m->direct_bytes += PAGE_SIZE;
					n++;
					continue;
				}
				ret = vmig_stream_add_page(m->w, m->regions[ri].gpa +
							   (p - first) * PAGE_SIZE,
							   m->regions[ri].hva + (p - first) * PAGE_SIZE,
							   mode);
				if (ret)
					return writer_error(m, ret);
				n++;
			}
			if ((n >> 10) != batches) {
				batches = n >> 10;
				if (cancelled(m))
					return -ECANCELED;
				ret = check_peer(m);
				if (!ret)
					ret = pace(m, &m->pace, m->w);
				if (ret == -ECANCELED)
					cancelled(m);
				if (ret)
					return ret;
				if (vmig__now_ns() - m->last_progress_ns > PROGRESS_NS) {
					pthread_mutex_lock(&m->lock);
					m->stats.remaining_bytes = m->stats.dirty_pages > n ?
						(m->stats.dirty_pages - n) * m->bytes_per_page : 0;
					pthread_mutex_unlock(&m->lock);
					publish(m, m->stats.status);
				}
			}
			page = vmig_bitmap_next_set(&m->dirty, word_end);
		}
	}
	*sent = n;
	return 0;
}

/* ---- channels ----------------------------------------------------------
 *
 * With --channels N the pages of each pass are split by stripes of
 * STRIPE_PAGES (2 MiB of RAM, eight bitmap words) among the migration
 * thread's own connection and N - 1 extra ones, each sent by its own thread
 * with its own writer (and so its own compression and checksums).  A page
 * always travels on the same connection (its stripe's), so two copies of
 * it arrive in the order they were sent.  On top of that, each sender ends
 * its share of pass k with ITER_END(k) on its connection and the
 * destination applies no page of pass k + 1 on any connection before every
 * connection has reached ITER_END(k) (see dst.c): ITER_DONE and the final
 * pass then mean what they say for all connections.  Control records (CONFIG, STATE,
 * SWITCHOVER, the handoff) stay on the first connection.
 *
 * The dirty bitmap is shared: during a pass each sender reads and clears
 * only the words of its own stripes; the migration thread re-arms the
 * whole log before the pass starts (one clear per region), since a single
 * thread must do that.
 */
#define STRIPE_PAGES 512u
#define STRIPE_WORDS (STRIPE_PAGES / VMIG_BITS_PER_LONG)

/* Totals over every writer: the thread's own and the channels' snapshots. */
static void total_stats(struct vmig_migration *m, struct vmig_stream_stats *out)
{
	unsigned int i;

	vmig_stream_writer_stats(m->w, out);
	out->bytes += out->pending + m->direct_bytes;
	out->pending = 0;
	out->pages_raw += m->direct_pages;
	for (i = 1; i < m->nr_ch; i++) {        /* under m->lock, or joined */
		out->bytes += m->ch[i].ws.bytes + m->ch[i].ws.pending;
		out->pages_zero += m->ch[i].ws.pages_zero;
		out->pages_raw += m->ch[i].ws.pages_raw;
		out->pages_lz4 += m->ch[i].ws.pages_lz4;
	}
}

/*
 * Send the dirty pages of stripe set @c (of m->nr_ch) with @w, clearing
 * their bits.  Any sender thread; touches only its own bitmap words.
 */
static int send_stripes(struct vmig_migration *m, unsigned int c, struct vmig_stream_writer *w,
			struct pacer *pc, uint64_t *sent)
{
	unsigned int n = m->nr_ch, ri;
	uint64_t count = 0, batches = 0;
	int ret;

	for (ri = 0; ri < m->nr_regions; ri++) {
		uint64_t first = m->regions[ri].first_page, end = first + m->regions[ri].nr_pages;
		uint64_t wi = first / VMIG_BITS_PER_LONG;
		uint64_t wend = (end + VMIG_BITS_PER_LONG - 1) / VMIG_BITS_PER_LONG;

		for (; wi < wend; wi++) {
			unsigned long word;

			if ((wi / STRIPE_WORDS) % n != c) {
				/* To the next stripe of ours. */
				wi = (wi / STRIPE_WORDS + 1) * STRIPE_WORDS - 1;
				continue;
			}
			word = m->dirty.words[wi];
			if (!word)
				continue;
			m->dirty.words[wi] = 0;
			while (word) {
				uint64_t p = wi * VMIG_BITS_PER_LONG + (uint64_t)__builtin_ctzl(word);

				word &= word - 1;
				if (p < first || p >= end)
					continue;   /* a neighbour region's: never, they are aligned */
				ret = vmig_stream_add_page(w, m->regions[ri].gpa +
							   (p - first) * PAGE_SIZE,
							   m->regions[ri].hva + (p - first) * PAGE_SIZE,
							   m->p.compress);
				if (ret)
					return ret;
				count++;
			}
			if ((count >> 10) != batches) {
				batches = count >> 10;
				if (atomic_load(&m->cancel) || atomic_load(&m->ch_abort))
					return -ECANCELED;
				ret = pace(m, pc, w);
				if (ret)
					return ret;
			}
		}
	}
	*sent = count;
	return 0;
}

static void *channel_thread(void *arg)
{
	struct src_channel *ch = arg;
	struct vmig_migration *m = ch->m;
	uint64_t iter, sent = 0;
	bool last;
	int ret;

	pthread_mutex_lock(&m->lock);
	for (;;) {
		while (!m->ch_quit && ch->work_iter == ch->done_iter)
			pthread_cond_wait(&m->ch_cond, &m->lock);
		if (m->ch_quit)
			break;
		iter = ch->work_iter;
		last = ch->last;
		pthread_mutex_unlock(&m->lock);

		pace_reset(m, &ch->pace, ch->w);
		ret = send_stripes(m, ch->index, ch->w, &ch->pace, &sent);
		if (!ret)
			ret = vmig_stream_write_iter_end(ch->w, iter, sent);
		if (!ret)
			ret = last ? vmig_stream_finish(ch->w) : vmig_stream_flush(ch->w);

		pthread_mutex_lock(&m->lock);
		vmig_stream_writer_stats(ch->w, &ch->ws);
		ch->sent = sent;
		ch->done_iter = iter;
		if (ret && !ch->error) {
			const struct vmig_err *we = vmig_stream_writer_err(ch->w);

			ch->error = ret;
			if (ret == -ECANCELED)
				vmig_err_set(&ch->err, ret, "cancelled on request");
			else if (we && we->code)
				vmig_err_set(&ch->err, we->code, "channel %u: %s", ch->index, we->msg);
			else
				vmig_err_set(&ch->err, ret, "channel %u: %s", ch->index,
					     strerror(-ret));
		}
		pthread_cond_broadcast(&m->ch_cond);
		if (ret)
			break;
	}
	pthread_mutex_unlock(&m->lock);
	return NULL;
}

/* Connect and start the extra channels (setup, after CONFIG went out). */
static int channels_open(struct vmig_migration *m)
{
	struct vmig_err cerr = { 0 };
	unsigned int i;
	int ret;

	for (i = 1; i < m->nr_ch; i++) {
		struct src_channel *ch = &m->ch[i];

		ch->m = m;
		ch->index = i;
		if (m->p.ssh) {
			/*
			 * An SSH connection of its own (its own cipher, its own
			 * thread): the remote `vmig incoming --join` hands its
			 * stdin/stdout to the `incoming --stdio` of this migration.
			 */
			struct vmig_ssh_options o = *m->p.ssh;
			char args[64];

			snprintf(args, sizeof(args), "incoming --join %016" PRIx64, m->session);
			o.remote_args = args;
			ret = vmig_transport_connect_ssh(m->uri, &o, CONNECT_TIMEOUT_MS, &ch->t,
							 &cerr);
		} else {
			ret = vmig_transport_connect(m->uri, CONNECT_TIMEOUT_MS, &ch->t, &cerr);
		}
		if (ret) {
			/*
			 * A destination that refused the stream (say, an older
			 * vmig) has closed its listener too: its reason, which
			 * is on its way on the first connection, comes first.
			 */
			struct pollfd pfd = { .fd = vmig_transport_fd(m->t), .events = POLLIN };

			if (pfd.fd >= 0)
				poll(&pfd, 1, 500);
			peer_reason(m);
			vmig_err_set(&m->err, cerr.code, "%s", cerr.msg);
			return ret;
		}
		vmig_transport_set_timeout(ch->t, IO_TIMEOUT_MS);
		ret = vmig_stream_writer_create(ch->t, VMIG_STREAM_FORWARD, &ch->w);
		if (!ret && m->p.stream_version != 1)
			ret = vmig_stream_writer_set_live(ch->w, true);
		if (ret) {
			vmig_err_set(&m->err, ret, "out of memory");
			return ret;
		}
		ret = vmig_stream_write_header(ch->w);
		if (!ret)
			ret = vmig_stream_write_channel(ch->w, m->session, i, m->nr_ch);
		if (!ret)
			ret = vmig_stream_flush(ch->w);
		if (ret) {
			const struct vmig_err *we = vmig_stream_writer_err(ch->w);

			vmig_err_set(&m->err, ret, "channel %u: %s", i,
				     we && we->code ? we->msg : strerror(-ret));
			return ret;
		}
		ret = -pthread_create(&ch->thread, NULL, channel_thread, ch);
		if (ret) {
			vmig_err_set(&m->err, ret, "cannot start a channel thread: %s",
				     strerror(-ret));
			return ret;
		}
		ch->started = true;
	}
	return 0;
}

/* Stop and join the channel threads, close their connections. */
static void channels_close(struct vmig_migration *m)
{
	unsigned int i;

	pthread_mutex_lock(&m->lock);
	m->ch_quit = true;
	pthread_cond_broadcast(&m->ch_cond);
	pthread_mutex_unlock(&m->lock);
	for (i = 1; i < m->nr_ch; i++) {
		struct src_channel *ch = &m->ch[i];

		/* A thread blocked writing to a dead peer: unblock it. */
		if (ch->started && ch->t && vmig_transport_fd(ch->t) >= 0)
			shutdown(vmig_transport_fd(ch->t), SHUT_RDWR);
		if (ch->started)
			pthread_join(ch->thread, NULL);
		ch->started = false;
		vmig_stream_writer_destroy(ch->w);
		vmig_transport_close(ch->t);
		ch->w = NULL;
		ch->t = NULL;
	}
}

/*
 * One pass (iteration @iter; @last: the final one, VM paused): every page
 * in m->dirty goes out, over every channel.  *@sent: pages sent.
 */
static int send_pass(struct vmig_migration *m, uint64_t iter, bool last, uint64_t *sent)
{
	uint64_t mine = 0, total;
	unsigned int i;
	int ret = 0, waited = 0;

	if (m->nr_ch <= 1)
		return send_dirty(m, sent);

	/* Re-arm everything reported before any page is read (one thread). */
	for (i = 0; i < m->nr_regions && !ret; i++)
		ret = vmig_dirtylog_clear(m->dl, m->regions[i].first_page,
					  m->regions[i].nr_pages, &m->err);
	if (ret)
		return ret;
	pthread_mutex_lock(&m->lock);
	for (i = 1; i < m->nr_ch; i++) {
		m->ch[i].work_iter = iter;
		m->ch[i].last = last;
	}
	pthread_cond_broadcast(&m->ch_cond);
	pthread_mutex_unlock(&m->lock);

	ret = send_stripes(m, 0, m->w, &m->pace, &mine);
	if (ret == -ECANCELED)
		cancelled(m);
	else if (ret)
		ret = writer_error(m, ret);

	/* Wait for the channels; keep reading the destination's replies. */
	pthread_mutex_lock(&m->lock);
	for (;;) {
		bool done = true;

		for (i = 1; i < m->nr_ch; i++) {
			if (m->ch[i].error) {
				if (!ret) {
					pthread_mutex_unlock(&m->lock);
					peer_reason(m);
					pthread_mutex_lock(&m->lock);
					if (!m->err.code)
						m->err = m->ch[i].err;
					ret = m->ch[i].error;
				}
			} else if (m->ch[i].done_iter < iter) {
				done = false;
			}
		}
		if (ret) {
			/* Stop the others: they may be blocked on a dead peer. */
			atomic_store(&m->ch_abort, true);
			if (!done) {
				pthread_mutex_unlock(&m->lock);
				channels_close(m);
				pthread_mutex_lock(&m->lock);
			}
			break;
		}
		if (done)
			break;
		{
			struct timespec ts;

			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_nsec += 50000000;
			if (ts.tv_nsec >= 1000000000L) {
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000L;
			}
			pthread_cond_timedwait(&m->ch_cond, &m->lock, &ts);
		}
		if (++waited % 4 == 0) {
			pthread_mutex_unlock(&m->lock);
			ret = cancelled(m) ? -ECANCELED : check_peer(m);
			pthread_mutex_lock(&m->lock);
		}
	}
	total = mine;
	for (i = 1; i < m->nr_ch; i++)
		total += m->ch[i].sent;
	pthread_mutex_unlock(&m->lock);
	*sent = total;
	return ret;
}

static int emit_state(void *arg, const char *name, uint16_t version, uint32_t instance,
		      const void *data, size_t len)
{
	struct vmig_migration *m = arg;
	int ret = vmig_stream_write_state(m->w, name, version, instance, data, len);

	if (ret)
		return writer_error(m, ret);
	m->stats.state_bytes += len;
	return 0;
}

/*
 * Remember [gpa, gpa + len) for the EXTENTS hint.  Past the record's limit
 * the last range grows to cover the new one: a coarser hint, never a
 * missing one.
 */
static void note_extent(struct vmig_migration *m, uint64_t gpa, uint64_t len)
{
	struct vmig_stream_extent *e = m->extents;

	if (!e) {
		e = calloc(VMIG_STREAM_MAX_EXTENTS, sizeof(*e));
		if (!e)
			return;                     /* no hint: nothing breaks */
		m->extents = e;
	}
	if (m->nr_extents && e[m->nr_extents - 1].gpa + e[m->nr_extents - 1].len == gpa) {
		e[m->nr_extents - 1].len += len;
	} else if (m->nr_extents == VMIG_STREAM_MAX_EXTENTS) {
		e[m->nr_extents - 1].len = gpa + len - e[m->nr_extents - 1].gpa;
	} else {
		e[m->nr_extents].gpa = gpa;
		e[m->nr_extents].len = len;
		m->nr_extents++;
	}
}

static void mark_data_extents(struct vmig_migration *m)
{
	int fd = vmig_vm_mem_fd(m->vm);
	const struct vmig_mem_region *r;
	unsigned int i, n = vmig_vm_regions(m->vm, &r);

	for (i = 0; i < n; i++) {
		off_t pos = (off_t)r[i].offset, end = (off_t)(r[i].offset + r[i].size);

		while (pos < end) {
			off_t data = lseek(fd, pos, SEEK_DATA), hole;

			if (data < 0 && errno == ENXIO)
				break;                      /* no data up to the end */
			if (data < 0) {                     /* no SEEK_DATA: send all */
				vmig_bitmap_set_range(&m->dirty, m->regions[i].first_page +
						      (pos - r[i].offset) / PAGE_SIZE,
						      (end - pos) / PAGE_SIZE);
				note_extent(m, r[i].gpa + (uint64_t)(pos - r[i].offset),
					    (uint64_t)(end - pos));
				break;
			}
			if (data >= end)
				break;
			hole = lseek(fd, data, SEEK_HOLE);
			if (hole < 0 || hole > end)
				hole = end;
			data &= ~(off_t)(PAGE_SIZE - 1);
			hole = (hole + PAGE_SIZE - 1) & ~(off_t)(PAGE_SIZE - 1);
			if (hole > end)
				hole = end;
			vmig_bitmap_set_range(&m->dirty, m->regions[i].first_page +
					      (data - r[i].offset) / PAGE_SIZE,
					      (hole - data) / PAGE_SIZE);
			note_extent(m, r[i].gpa + (uint64_t)(data - r[i].offset),
				    (uint64_t)(hole - data));
			pos = hole;
		}
	}
}

/*
 * In bitmap-clear mode with KVM_DIRTY_LOG_INITIALLY_SET every page starts
 * out reported dirty and is only write-protected (tracked) once cleared.
 * Iteration 1 sends the data extents only, so take that first report now
 * and re-arm every page, holes included, before any page is read: from
 * here on every guest write is reported by a later sync.
 */
static int arm_all(struct vmig_migration *m)
{
	struct vmig_bitmap first;
	int ret = vmig_bitmap_init(&first, m->nr_pages);

	if (ret) {
		vmig_err_set(&m->err, ret, "out of memory for the dirty bitmap");
		return ret;
	}
	ret = vmig_dirtylog_sync(m->dl, &first, &m->err);
	if (!ret)
		ret = vmig_dirtylog_clear(m->dl, 0, m->nr_pages, &m->err);
	vmig_bitmap_fini(&first);
	return ret;
}

static int setup(struct vmig_migration *m)
{
	const struct vmig_mem_region *r;
	struct json_object *cfg;
	struct vmig_uri uri;
	uint64_t t0, first = 0;
	unsigned int i;
	int ret;

	ret = vmig_transport_parse_uri(m->uri, &uri, &m->err);
	if (ret)
		return ret;
	m->is_file = uri.kind == VMIG_URI_FILE;
	t0 = vmig__now_ns();
	if (m->is_file) {
		/*
		 * Write beside the target and rename at the end: a failed save
		 * (full disk, cancel) never destroys an older file of that name,
		 * and a file of that name is always complete.
		 */
		struct stat sb;
		char *real = realpath(uri.path, NULL);

		/* Through a symlink: write beside the file it names. */
		m->file_path = real ? real : strdup(uri.path);
		if (!m->file_path) {
			vmig_err_set(&m->err, -ENOMEM, "out of memory");
			return -ENOMEM;
		}
		if (stat(m->file_path, &sb) == 0 && !S_ISREG(sb.st_mode)) {
			/* A device or a pipe: write straight to it, never replace it. */
			ret = vmig_transport_open_file(m->file_path, true, &m->t, &m->err);
		} else if (asprintf(&m->tmp_path, "%s.partial.%d", m->file_path,
				    (int)getpid()) < 0) {
			m->tmp_path = NULL;
			vmig_err_set(&m->err, -ENOMEM, "out of memory");
			return -ENOMEM;
		} else {
			ret = vmig_transport_open_file(m->tmp_path, true, &m->t, &m->err);
		}
	}
	else if (uri.kind == VMIG_URI_SSH)
		ret = vmig_transport_connect_ssh(m->uri, m->p.ssh, CONNECT_TIMEOUT_MS, &m->t,
						 &m->err);
	else
		ret = vmig_transport_connect(m->uri, CONNECT_TIMEOUT_MS, &m->t, &m->err);
	if (ret)
		return ret;
	m->rtt_ns = vmig__now_ns() - t0;
	/* SSH's log-in takes several round trips and some crypto: ask TCP. */
	if (uri.kind == VMIG_URI_SSH)
		m->rtt_ns = vmig_transport_ssh_rtt_ns(m->t);
	vmig_transport_set_timeout(m->t, IO_TIMEOUT_MS);
	ret = vmig_stream_writer_create(m->t, VMIG_STREAM_FORWARD, &m->w);
	/* Raw pages straight from guest RAM (LIVE_PAGES), no copy. */
	if (!ret && m->p.stream_version != 1)
		ret = vmig_stream_writer_set_live(m->w, true);
	if (!ret && !m->is_file)
		ret = vmig_stream_reader_create(m->t, VMIG_STREAM_REVERSE, &m->r);
	if (ret) {
		vmig_err_set(&m->err, ret, "out of memory");
		return ret;
	}

	m->nr_regions = vmig_vm_regions(m->vm, &r);
	for (i = 0; i < m->nr_regions; i++) {
		m->regions[i].first_page = first;
		m->regions[i].nr_pages = r[i].size / PAGE_SIZE;
		m->regions[i].gpa = r[i].gpa;
		m->regions[i].hva = r[i].hva;
		first += r[i].size / PAGE_SIZE;
	}
	m->nr_pages = first;
	m->stats.ram_total_bytes = first * PAGE_SIZE;
	ret = vmig_bitmap_init(&m->dirty, m->nr_pages);
	if (ret) {
		vmig_err_set(&m->err, ret, "out of memory for the dirty bitmap");
		return ret;
	}
	/*
	 * Iteration 1 sends everything that was ever written.  The
	 * destination's RAM starts zeroed, so the memfd's holes (RAM the guest
	 * never touched) need no page at all, and are never read: reading
	 * them would allocate them here.
	 */
	mark_data_extents(m);

	ret = vmig_dirtylog_create(m->vm, VMIG_DIRTYLOG_AUTO, &m->dl, &m->err);
	if (!ret)
		ret = vmig_dirtylog_start(m->dl, &m->err);
	if (!ret)
		ret = arm_all(m);
	if (ret)
		return ret;

	ret = vmig_stream_write_header(m->w);
	if (ret)
		return writer_error(m, ret);
	cfg = vmig__config_build(m->vm, m->was_running, m->p.resume_dst, !m->is_file);
	if (m->nr_ch > 1) {
		json_object_object_add(cfg, "channels", json_object_new_int((int)m->nr_ch));
		json_object_object_add(cfg, "session", json_object_new_uint64(m->session));
	}
	ret = vmig_stream_write_config(m->w, cfg);
	json_object_put(cfg);
	/* Tell the destination early which RAM is coming, so it can fault
	 * it in while the pages are on their way. */
	if (!ret && m->nr_extents)
		ret = vmig_stream_write_extents(m->w, m->extents, m->nr_extents);
	free(m->extents);
	m->extents = NULL;
	/*
	 * What never changes while the VM lives (a Linux guest's kernel and
	 * initrd, megabytes) goes now, not in the pause.
	 */
	if (!ret)
		ret = vmig_vm_state_save_parts(m->vm, VMIG_STATE_BOOT, emit_state, m, &m->err);
	if (!ret)
		ret = vmig_stream_flush(m->w);
	if (ret)
		return writer_error(m, ret);
	if (uri.kind == VMIG_URI_RDMA) {
		/* Does the destination take pages straight into its RAM? */
		ret = vmig_transport_peer_memory(m->t, -1);
		if (ret == 0)
			m->direct = true;
		else if (ret != -EOPNOTSUPP)
			return direct_error(m, ret);
		vmig_log(VMIG_LOG_INFO, "rdma: pages go %s", m->direct ?
			 "straight into the destination's RAM (RDMA WRITE)" : "in PAGES records");
	}
	ret = m->nr_ch > 1 ? channels_open(m) : 0;
	vmig_log(VMIG_LOG_DEBUG, "setup done at %" PRIu64 " us (connected after %" PRIu64
		 " us)", (vmig__now_ns() - m->start_ns) / 1000, m->rtt_ns / 1000);
	return ret;
}

/* Fold a fresh sync into m->dirty; returns the dirty count. */
static int sync_dirty(struct vmig_migration *m, uint64_t *count)
{
	int ret = vmig_dirtylog_sync(m->dl, &m->dirty, &m->err);

	if (!ret)
		*count = vmig_bitmap_count(&m->dirty);
	return ret;
}

/*
 * Auto-converge, after pass @iter: when the guest dirtied more bytes than
 * half of what the link carried in the same time, two passes in a row,
 * slow its vCPUs down one step (as QEMU's cpu-throttle does).  The first
 * pass sends the whole RAM and says nothing about the dirty rate.
 */
static void auto_converge(struct vmig_migration *m, uint64_t iter, uint64_t dirty,
			  uint64_t bpp)
{
	uint64_t dirty_bps, link_bps;
	unsigned int pct;

	if (!m->p.throttle_max || iter < 2)
		return;
	pthread_mutex_lock(&m->lock);
	dirty_bps = m->stats.dirty_rate_pps * bpp;
	link_bps = m->stats.bandwidth_bps;
	pthread_mutex_unlock(&m->lock);
	if (!dirty || dirty_bps * 2 <= link_bps) {
		m->hot_iters = 0;
		return;
	}
	if (++m->hot_iters < 2 || m->throttle >= m->p.throttle_max)
		return;
	m->hot_iters = 0;
	pct = m->throttle ? m->throttle + m->p.throttle_step : m->p.throttle_initial;
	if (pct > m->p.throttle_max)
		pct = m->p.throttle_max;
	if (pct > VMIG_VM_MAX_THROTTLE)
		pct = VMIG_VM_MAX_THROTTLE;
	if (vmig_vm_set_throttle(m->vm, pct))
		return;
	m->throttle = pct;
	vmig_log(VMIG_LOG_INFO, "auto-converge: the guest dirties %" PRIu64 " MiB/s, the "
		 "link carries %" PRIu64 " MiB/s: vCPUs throttled to %u %%",
		 dirty_bps >> 20, link_bps >> 20, pct);
	pthread_mutex_lock(&m->lock);
	m->stats.throttle_pct = pct;
	pthread_mutex_unlock(&m->lock);
}

static int precopy(struct vmig_migration *m)
{
	uint64_t iter = 0, dirty = m->nr_pages, sent, t0, b0, dt, bytes, bpp = PAGE_SIZE;
	uint64_t fixed_ms, deadline = m->p.timeout_s ?
		m->start_ns + (uint64_t)m->p.timeout_s * 1000000000ull : 0;
	struct vmig_stream_stats ws;
	int ret;

	for (;;) {
		iter++;
		pthread_mutex_lock(&m->lock);
		total_stats(m, &ws);
		pthread_mutex_unlock(&m->lock);
		b0 = ws.bytes;
		t0 = vmig__now_ns();
		pthread_mutex_lock(&m->lock);
		m->stats.iteration = iter;
		m->stats.dirty_pages = vmig_bitmap_count(&m->dirty);
		m->bytes_per_page = bpp;
		pthread_mutex_unlock(&m->lock);

		pace_reset(m, &m->pace, m->w);
		ret = send_pass(m, iter, false, &sent);
		if (!ret)
			ret = direct_fence(m);
		if (!ret)
			ret = vmig_stream_write_iter_end(m->w, iter, sent);
		if (!ret)
			ret = vmig_stream_flush(m->w);
		if (ret)
			return ret == -ECANCELED || m->err.code ? ret : writer_error(m, ret);

		dt = vmig__now_ns() - t0;
		vmig_log(VMIG_LOG_DEBUG, "pass %" PRIu64 ": %" PRIu64 " pages in %" PRIu64
			 " us, ends at %" PRIu64 " us", iter, sent, dt / 1000,
			 (vmig__now_ns() - m->start_ns) / 1000);
		if (dt < MIN_ITERATION_NS) {
			/* Near-empty passes by the thousand only burn CPU on syncs:
			 * let the dirty pages gather a little. */
			struct timespec ts = { 0, (long)(MIN_ITERATION_NS - dt) };

			nanosleep(&ts, NULL);
			dt = vmig__now_ns() - t0;
		}
		pthread_mutex_lock(&m->lock);
		total_stats(m, &ws);
		pthread_mutex_unlock(&m->lock);
		bytes = ws.bytes - b0;
		if (sent)
			bpp = bytes / sent ? bytes / sent : 1;
		ret = sync_dirty(m, &dirty);
		if (ret)
			return ret;
		if (cancelled(m))
			return -ECANCELED;

		pthread_mutex_lock(&m->lock);
		m->stats.dirty_pages = dirty;
		if (dt > 1000000) {
			m->stats.bandwidth_bps = bytes * 1000000000ull / dt;
			m->stats.dirty_rate_pps = dirty * 1000000000ull / dt;
		}
		m->stats.remaining_bytes = dirty * bpp;
		fixed_ms = 2 * m->rtt_ns / 1000000 + 2 +
			(m->stats.bandwidth_bps ? (uint64_t)vmig_vm_nr_vcpus(m->vm) *
			 EST_STATE_PER_VCPU * 1000 / m->stats.bandwidth_bps : 0);
		m->stats.expected_downtime_ms = fixed_ms + (m->stats.bandwidth_bps ?
			m->stats.remaining_bytes * 1000 / m->stats.bandwidth_bps : 0);
		if (m->stats.bandwidth_bps > 0 && m->stats.bandwidth_bps > m->stats.dirty_rate_pps * bpp)
			m->stats.eta_ms = m->stats.remaining_bytes * 1000 /
				(m->stats.bandwidth_bps - m->stats.dirty_rate_pps * bpp);
		else
			m->stats.eta_ms = 0;
		pthread_mutex_unlock(&m->lock);
		/* Short iterations come by the thousand: report a few per second,
		 * but always the end of the first pass and of long ones. */
		if (iter == 1 || dt >= PROGRESS_NS / 4 ||
		    vmig__now_ns() - m->last_progress_ns >= PROGRESS_NS)
			publish(m, VMIG_MIGRATE_ACTIVE);

		/* A paused VM (or a save) goes in one pass: nothing dirties it. */
		if (!m->was_running || m->paused_here)
			return 0;
		auto_converge(m, iter, dirty, bpp);
		if (m->stats.expected_downtime_ms <= m->p.max_downtime_ms) {
			if (m->is_file)
				return 0;
			/*
			 * The socket took the data; has the destination applied it?
			 * Wait for its ITER_DONE, then judge again with the bandwidth
			 * it achieved and what the guest dirtied meanwhile.
			 */
			ret = wait_ack(m, iter);
			if (ret)
				return ret;
			ret = sync_dirty(m, &dirty);
			if (ret)
				return ret;
			dt = m->acked_ns - t0;
			pthread_mutex_lock(&m->lock);
			if (dt > 1000000)
				m->stats.bandwidth_bps = bytes * 1000000000ull / dt;
			m->stats.dirty_pages = dirty;
			m->stats.remaining_bytes = dirty * bpp;
			m->stats.expected_downtime_ms = fixed_ms + (m->stats.bandwidth_bps ?
				m->stats.remaining_bytes * 1000 / m->stats.bandwidth_bps : 0);
			pthread_mutex_unlock(&m->lock);
			if (m->stats.expected_downtime_ms <= m->p.max_downtime_ms)
				return 0;
		}
		if (deadline && vmig__now_ns() >= deadline) {
			if (m->p.on_timeout == VMIG_ON_TIMEOUT_FORCE) {
				vmig_log(VMIG_LOG_WARN, "timeout: forcing the switchover with %"
					 PRIu64 " ms expected downtime",
					 m->stats.expected_downtime_ms);
				return 0;
			}
			vmig_err_set(&m->err, -ETIMEDOUT, "did not converge within %u s "
				     "(expected downtime %" PRIu64 " ms > limit %u ms)",
				     m->p.timeout_s, m->stats.expected_downtime_ms,
				     m->p.max_downtime_ms);
			return -ETIMEDOUT;
		}
	}
}

/* Read one reverse record within @timeout_ms. */
static int read_reply(struct vmig_migration *m, int timeout_ms, struct vmig_record *rec)
{
	int ret;

	vmig_transport_set_timeout(m->t, timeout_ms);
	for (;;) {
		ret = read_reverse(m, rec);
		if (ret || rec->type != VMIG_REC_ITER_DONE)
			return ret;
		ret = take_ack(m, rec);   /* the final iteration's: not a reply */
		if (ret)
			return ret;
	}
}

static int switchover(struct vmig_migration *m)
{
	struct vmig_record rec;
	uint64_t dirty, sent;
	char msg[512];
	int ret, e;

	publish(m, VMIG_MIGRATE_SWITCHOVER);
	if (vmig_vm_state(m->vm) == VMIG_VM_RUNNING) {
		ret = vmig_vm_pause(m->vm);
		if (ret) {
			vmig_err_set(&m->err, ret, "the VM stopped during the migration");
			return ret;
		}
		m->paused_here = true;
		m->pause_ns = vmig__now_ns();
	} else if (!m->pause_ns) {
		m->pause_ns = vmig__now_ns();
	}
	/* Paused: every write is in the log now (dirtylog.h, rule 3). */
	vmig_log(VMIG_LOG_DEBUG, "switchover: paused after %" PRIu64 " us",
		 (vmig__now_ns() - m->pause_ns) / 1000);
	ret = sync_dirty(m, &dirty);
	if (!ret)
		ret = send_pass(m, m->stats.iteration + 1, true, &sent);
	if (!ret)
		ret = direct_fence(m);
	if (!ret)
		ret = vmig_stream_write_iter_end(m->w, m->stats.iteration + 1, sent);
	if (ret)
		return m->err.code ? ret : writer_error(m, ret);
	vmig_log(VMIG_LOG_DEBUG, "switchover: %" PRIu64 " last pages sent at %" PRIu64 " us",
		 sent, (vmig__now_ns() - m->pause_ns) / 1000);
	/* The boot images went before the first pass (setup). */
	ret = vmig_vm_state_save_parts(m->vm, VMIG_STATE_MACHINE, emit_state, m, &m->err);
	if (ret)
		return ret;
	vmig_log(VMIG_LOG_DEBUG, "switchover: state saved at %" PRIu64 " us",
		 (vmig__now_ns() - m->pause_ns) / 1000);
	ret = vmig_stream_write_record(m->w, VMIG_REC_SWITCHOVER, 0, NULL, 0);
	if (ret)
		return writer_error(m, ret);

	if (m->is_file) {
		ret = vmig_stream_finish(m->w);   /* END, fsync: a full disk shows here */
		if (ret)
			return writer_error(m, ret);
		if (m->tmp_path && rename(m->tmp_path, m->file_path) < 0) {
			ret = -errno;
			vmig_err_set(&m->err, ret, "cannot rename %s to %s: %s", m->tmp_path,
				     m->file_path, strerror(-ret));
			return ret;
		}
		free(m->tmp_path);
		m->tmp_path = NULL;
		return 0;
	}
	ret = vmig_stream_flush(m->w);
	if (ret)
		return writer_error(m, ret);

	ret = read_reply(m, REPLY_TIMEOUT_MS, &rec);
	if (ret)
		return ret;
	if (rec.type == VMIG_REC_NACK) {
		if (vmig_stream_parse_error(&rec, &e, msg, sizeof(msg), &m->err) == 0)
			vmig_err_set(&m->err, e ? e : -EPROTO, "the destination refused the VM: %s", msg);
		return m->err.code;
	}
	vmig_log(VMIG_LOG_DEBUG, "switchover: %s at %" PRIu64 " us",
		 vmig_stream_rec_name(rec.type), (vmig__now_ns() - m->pause_ns) / 1000);
	if (rec.type != VMIG_REC_READY) {
		vmig_err_set(&m->err, -EPROTO, "the destination answered the switchover with %s",
			     vmig_stream_rec_name(rec.type));
		return -EPROTO;
	}
	if (cancelled(m))
		return -ECANCELED;

	/* From here on this side never resumes the VM on its own. */
	m->committed = true;
	ret = vmig_stream_write_record(m->w, VMIG_REC_COMMIT, 0, NULL, 0);
	if (!ret)
		ret = vmig_stream_flush(m->w);
	if (ret)
		return writer_error(m, ret);
	ret = read_reply(m, REPLY_TIMEOUT_MS, &rec);
	if (ret)
		return ret;
	if (rec.type != VMIG_REC_RUNNING) {
		vmig_err_set(&m->err, -EPROTO, "the destination answered COMMIT with %s",
			     vmig_stream_rec_name(rec.type));
		return -EPROTO;
	}
	return 0;
}

static void teardown(struct vmig_migration *m)
{
	struct vmig_err ignore = { 0 };

	channels_close(m);
	/* Whoever runs the VM next (here after a failure) runs it at full speed. */
	if (m->throttle) {
		vmig_vm_set_throttle(m->vm, 0);
		m->throttle = 0;
	}

	if (m->dl) {
		vmig_dirtylog_stop(m->dl, &ignore);
		vmig_dirtylog_destroy(m->dl);
		m->dl = NULL;
	}
	vmig_stream_writer_destroy(m->w);
	vmig_stream_reader_destroy(m->r);
	vmig_transport_close(m->t);
	m->w = NULL;
	m->r = NULL;
	m->t = NULL;
	vmig_bitmap_fini(&m->dirty);
	free(m->extents);
	m->extents = NULL;
}

static void *migration_thread(void *arg)
{
	struct vmig_migration *m = arg;
	enum vmig_migrate_status final;
	int ret;

	ret = setup(m);
	if (!ret) {
		m->stats.status = VMIG_MIGRATE_ACTIVE;
		ret = precopy(m);
	}
	if (!ret)
		ret = switchover(m);

	if (!ret) {
		final = VMIG_MIGRATE_COMPLETED;
		pthread_mutex_lock(&m->lock);
		m->stats.downtime_ms = (vmig__now_ns() - m->pause_ns) / 1000000;
		pthread_mutex_unlock(&m->lock);
		/* A save that keeps the VM: it goes on here, the file holds a copy. */
		if (m->is_file && !m->p.stop_after && m->paused_here)
			vmig_vm_resume(m->vm);
	} else if (m->committed) {
		final = VMIG_MIGRATE_UNCERTAIN;
		pthread_mutex_lock(&m->lock);
		snprintf(m->stats.error, sizeof(m->stats.error), "lost the destination after "
			 "COMMIT (%.400s)", m->err.msg[0] ? m->err.msg : strerror(-ret));
		m->stats.downtime_ms = (vmig__now_ns() - m->pause_ns) / 1000000;
		pthread_mutex_unlock(&m->lock);
	} else {
		final = ret == -ECANCELED ? VMIG_MIGRATE_CANCELLED : VMIG_MIGRATE_FAILED;
		/* Tell the destination why, if it can still hear it. */
		if (m->w && !m->is_file) {
			vmig_stream_write_error(m->w, VMIG_REC_ERROR, ret, "%s",
						m->err.msg[0] ? m->err.msg : strerror(-ret));
			vmig_stream_flush(m->w);
		}
		if (m->paused_here)
			vmig_vm_resume(m->vm);
		if (m->tmp_path)
			unlink(m->tmp_path);   /* a half-written save is worthless */
	}
	publish(m, m->stats.status);   /* the writer's last counters */
	teardown(m);
	pthread_mutex_lock(&m->lock);
	if (ret && !m->stats.error[0])
		snprintf(m->stats.error, sizeof(m->stats.error), "%s",
			 m->err.msg[0] ? m->err.msg : strerror(-ret));
	pthread_mutex_unlock(&m->lock);
	publish(m, final);
	return NULL;
}

int vmig_migrate_src_start(struct vmig_vm *vm, const struct vmig_migrate_params *p,
			   struct vmig_migration **out, struct vmig_err *err)
{
	struct vmig_migration *m;
	enum vmig_vm_state st = vmig_vm_state(vm);
	struct vmig_uri uri;
	int ret;

	*out = NULL;
	if (st != VMIG_VM_RUNNING && st != VMIG_VM_PAUSED) {
		vmig_err_set(err, -ESHUTDOWN, "the VM is not running");
		return -ESHUTDOWN;
	}
	ret = vmig_transport_parse_uri(p->uri, &uri, err);
	if (ret)
		return ret;
	if (uri.kind != VMIG_URI_TCP && uri.kind != VMIG_URI_UNIX && uri.kind != VMIG_URI_FILE &&
	    uri.kind != VMIG_URI_SSH && uri.kind != VMIG_URI_RDMA) {
		vmig_err_set(err, -EINVAL, "cannot migrate to '%s': use tcp://HOST:PORT, "
			     "unix:PATH, ssh://[USER@]HOST[:PORT], rdma://HOST:PORT or file:PATH",
			     p->uri);
		return -EINVAL;
	}
	if (p->channels > VMIG_MIGRATE_MAX_CHANNELS) {
		vmig_err_set(err, -EINVAL, "%u channels: at most %u", p->channels,
			     VMIG_MIGRATE_MAX_CHANNELS);
		return -EINVAL;
	}
	if (p->channels > 1 && uri.kind != VMIG_URI_TCP && uri.kind != VMIG_URI_UNIX &&
	    uri.kind != VMIG_URI_SSH) {
		vmig_err_set(err, -EINVAL, "several channels need tcp://, unix: or ssh:// "
			     "(not %s)", uri.kind == VMIG_URI_FILE ? "a file" : p->uri);
		return -EINVAL;
	}
	m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	m->vm = vm;
	m->p = *p;
	m->uri = strdup(p->uri);
	m->p.uri = m->uri;
	/* The SSH options live as long as the migration (freed with it). */
	m->p.ssh = uri.kind == VMIG_URI_SSH ? vmig_ssh_options_dup(p->ssh) : NULL;
	if (uri.kind == VMIG_URI_SSH && !m->p.ssh) {
		free(m->uri);
		m->uri = NULL;
	}
	m->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	pthread_mutex_init(&m->lock, NULL);
	m->start_ns = m->last_progress_ns = vmig__now_ns();
	m->was_running = st == VMIG_VM_RUNNING;
	m->stats.status = VMIG_MIGRATE_SETUP;
	atomic_init(&m->bw_limit, p->bandwidth_bps);
	m->stats.bandwidth_limit_bps = p->bandwidth_bps;
	pthread_cond_init(&m->ch_cond, NULL);
	m->nr_ch = p->channels > 1 ? p->channels : 1;
	m->stats.channels = m->nr_ch;
	m->stats.stream_version = p->stream_version == 1 ? 1 : 2;
	if (m->nr_ch > 1) {
		struct timespec ts;

		clock_gettime(CLOCK_REALTIME, &ts);
		m->session = ((uint64_t)getpid() << 32) ^ (uint64_t)ts.tv_nsec ^
			     ((uint64_t)ts.tv_sec << 20) ^ (uintptr_t)m;
	}
	if (!m->uri || m->event_fd < 0) {
		ret = m->uri ? -errno : -ENOMEM;
		goto fail;
	}
	/* A save takes a consistent image: pause first, then one pass. */
	if (uri.kind == VMIG_URI_FILE && m->was_running) {
		ret = vmig_vm_pause(vm);
		if (ret)
			goto fail;
		m->paused_here = true;
		m->pause_ns = vmig__now_ns();
	}
	ret = -pthread_create(&m->thread, NULL, migration_thread, m);
	if (ret) {
		if (m->paused_here)
			vmig_vm_resume(vm);
		goto fail;
	}
	m->thread_started = true;
	*out = m;
	return 0;
fail:
	vmig_err_set(err, ret, "cannot start the migration: %s", strerror(-ret));
	if (m->event_fd >= 0)
		close(m->event_fd);
	pthread_cond_destroy(&m->ch_cond);
	pthread_mutex_destroy(&m->lock);
	free(m->uri);
	free((void *)m->p.ssh);
	free(m);
	return ret;
}

int vmig_migrate_src_event_fd(const struct vmig_migration *m)
{
	return m->event_fd;
}

void vmig_migrate_src_stats(struct vmig_migration *m, struct vmig_migrate_stats *out)
{
	pthread_mutex_lock(&m->lock);
	*out = m->stats;
	if (!vmig_migrate_status_final(out->status))
		out->total_ms = (vmig__now_ns() - m->start_ns) / 1000000;
	pthread_mutex_unlock(&m->lock);
}

void vmig_migrate_src_set_bandwidth(struct vmig_migration *m, uint64_t bps)
{
	atomic_store(&m->bw_limit, bps);
	pthread_mutex_lock(&m->lock);
	m->stats.bandwidth_limit_bps = bps;
	pthread_mutex_unlock(&m->lock);
}

void vmig_migrate_src_cancel(struct vmig_migration *m)
{
	atomic_store(&m->cancel, true);
}

enum vmig_migrate_status vmig_migrate_src_finish(struct vmig_migration *m,
						 struct vmig_migrate_stats *final)
{
	enum vmig_migrate_status s;

	if (m->thread_started)
		pthread_join(m->thread, NULL);
	pthread_mutex_lock(&m->lock);
	if (final)
		*final = m->stats;
	s = m->stats.status;
	pthread_mutex_unlock(&m->lock);
	close(m->event_fd);
	pthread_cond_destroy(&m->ch_cond);
	pthread_mutex_destroy(&m->lock);
	free(m->uri);
	free((void *)m->p.ssh);
	free(m->file_path);
	free(m->tmp_path);
	free(m);
	return s;
}
