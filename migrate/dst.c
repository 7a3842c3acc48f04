/*
 * The destination side: read a stream, build the VM it describes, load it,
 * and take part in the handoff.
 *
 * Nothing from the stream is trusted: the codec checks framing, checksums
 * and page addresses; CONFIG is checked against the layout this vmig
 * builds and the host's CPU features before any memory is committed;
 * every state section is checked for name, version and size on load.  Any
 * error before COMMIT discards the half-built VM (its memory, fds and
 * threads) and tells the source why (NACK), so the source resumes.
 *
 * Order: CONFIG, then PAGES/ITER_END in any number, STATE sections, then
 * SWITCHOVER.  Live: READY (after loading and checking everything), wait
 * for COMMIT, start the vCPUs, RUNNING.  File: END, end of file.
 */
#include "config.h"

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <pthread.h>
#include <stdatomic.h>

#include <json-c/json.h>

#include "vmig/stream.h"
#include "vmig/transport.h"
#include "vmig/vm.h"
#include "migrate-internal.h"

#define DST_IO_TIMEOUT_MS 60000
#define MAX_SECTIONS      (64u * VMIG_VM_MAX_VCPUS + 64u)
#define POPULATE_CHUNK    (2u << 20)

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23        /* Linux 5.14 */
#endif

/*
 * Fault guest RAM in ahead of the pages (EXTENTS).  First touch of fresh
 * memory is the destination's slowest step (zeroing, and on a VM host the
 * host's own fault); done here it overlaps with receiving instead of
 * stalling each page copy.  MADV_POPULATE_WRITE maps pages writable
 * without writing them, so it never races with the receiver's copies.
 * One thread: on the machines measured, faults do not scale with threads.
 */
struct populate {
	pthread_t thread;
	bool started;
	atomic_bool stop;
	struct { uint8_t *hva; uint64_t len; } *ranges;
	size_t nr;
	uint64_t bytes, ns;
	int error;                        /* errno of a failed madvise, or 0 */
};

struct section {
	char name[VMIG_STREAM_STATE_NAME_MAX + 1];
	uint16_t version;
	uint32_t instance;
	void *data;
	size_t len;
};

struct dst;

/*
 * An extra channel of a --channels migration: a connection with its own
 * reader and thread that applies the PAGES it carries.  At ITER_END(k) it
 * waits until the main thread releases pass k, which it does once every
 * channel (and the main connection) has applied all of pass k: no page of
 * pass k + 1 lands before an older copy from pass k (src.c has the other
 * half of this rule).
 */
struct dst_channel {
	struct dst *d;
	unsigned int index;
	struct vmig_transport *t;
	struct vmig_stream_reader *r;
	pthread_t thread;
	bool started;
	struct vmig_err err;
	/* Under d->ch_lock. */
	uint64_t arrived;                 /* last ITER_END read */
	bool ended;                       /* END read */
	int error;
};

struct dst {
	struct vmig_transport *t;
	struct vmig_stream_reader *r;
	struct vmig_stream_writer *w;      /* replies; NULL for a file */
	struct vmig_vm *vm;
	struct vmig__config cfg;
	struct section *sec;
	size_t nr_sec;
	struct vmig_err *err;
	struct populate pop;
	struct dst_channel ch[VMIG_MIGRATE_MAX_CHANNELS];   /* [0] unused */
	unsigned int nr_ch;
	pthread_mutex_t ch_lock;
	pthread_cond_t ch_cond;
	uint64_t released;                /* passes every channel may go past */
	bool ch_failed, ch_quit;
	bool exposed;                     /* rdma://: RAM open to the source's writes */
};

/*
 * rdma://: let the source write pages straight into guest RAM.  Any
 * failure (memory that cannot be pinned, too many regions) declines, and
 * the source sends PAGES records instead: a slower migration, not a failed
 * one.  Other transports: nothing to do.
 */
static int expose_ram(struct dst *d)
{
	const struct vmig_mem_region *r;
	unsigned int nr = vmig_vm_regions(d->vm, &r), i;
	int ret = 0;

	for (i = 0; i < nr && !ret; i++)
		ret = vmig_transport_expose_memory(d->t, r[i].hva, r[i].size, r[i].gpa);
	if (ret == -EOPNOTSUPP && i == 1)
		return 0;                         /* not RDMA */
	if (ret) {
		vmig_log(VMIG_LOG_WARN, "rdma: cannot expose guest RAM (%s): pages will come "
			 "in the stream", strerror(-ret));
		vmig_transport_unexpose_memory(d->t);
		ret = vmig_transport_expose_done(d->t, ret);
	} else {
		ret = vmig_transport_expose_done(d->t, 0);
		d->exposed = !ret;
	}
	if (ret)
		vmig_err_set(d->err, ret, "cannot answer the source: %s", strerror(-ret));
	return ret;
}

/* Close guest RAM to remote writes (before state loads or vCPUs run). */
static void unexpose_ram(struct dst *d)
{
	if (d->exposed)
		vmig_transport_unexpose_memory(d->t);
	d->exposed = false;
}

static void *dst_channel_thread(void *arg)
{
	struct dst_channel *ch = arg;
	struct dst *d = ch->d;
	const struct vmig_mem_region *regions;
	unsigned int nr = vmig_vm_regions(d->vm, &regions);
	struct vmig_record rec;
	uint64_t iter, pages;
	char msg[512];
	int ret, e;

	ret = vmig_stream_reader_set_memory(ch->r, regions, nr);
	if (ret)
		vmig_err_set(&ch->err, ret, "out of memory");
	while (!ret) {
		ret = vmig_stream_read_record(ch->r, &rec, &ch->err);
		if (ret)
			break;
		if (rec.type == VMIG_REC_PAGES || rec.type == VMIG_REC_LIVE_PAGES) {
			/* Applied by the reader. */
		} else if (rec.type == VMIG_REC_ITER_END) {
			ret = vmig_stream_parse_iter_end(&rec, &iter, &pages, &ch->err);
			if (ret)
				break;
			pthread_mutex_lock(&d->ch_lock);
			ch->arrived = iter;
			pthread_cond_broadcast(&d->ch_cond);
			while (d->released < iter && !d->ch_failed && !d->ch_quit)
				pthread_cond_wait(&d->ch_cond, &d->ch_lock);
			if (d->ch_failed || d->ch_quit)
				ret = -ECANCELED;
			pthread_mutex_unlock(&d->ch_lock);
		} else if (rec.type == VMIG_REC_END) {
			pthread_mutex_lock(&d->ch_lock);
			ch->ended = true;
			pthread_cond_broadcast(&d->ch_cond);
			pthread_mutex_unlock(&d->ch_lock);
			return NULL;
		} else if (rec.type == VMIG_REC_ERROR) {
			ret = vmig_stream_parse_error(&rec, &e, msg, sizeof(msg), &ch->err);
			if (!ret) {
				vmig_err_set(&ch->err, e ? e : -ECANCELED,
					     "the source ended the migration: %s", msg);
				ret = e ? e : -ECANCELED;
			}
		} else {
			vmig_err_set(&ch->err, -EPROTO, "unexpected %s record at offset %" PRIu64,
				     vmig_stream_rec_name(rec.type), rec.offset);
			ret = -EPROTO;
		}
		if (ret)
			break;
	}
	/* Stop reading: the source's writes to this channel fail at once. */
	if (vmig_transport_fd(ch->t) >= 0)
		shutdown(vmig_transport_fd(ch->t), SHUT_RDWR);
	pthread_mutex_lock(&d->ch_lock);
	ch->error = ret;
	if (ret != -ECANCELED || !d->ch_quit)
		d->ch_failed = true;
	pthread_cond_broadcast(&d->ch_cond);
	pthread_mutex_unlock(&d->ch_lock);
	return NULL;
}

/* The first failed channel's error, into d->err; its code. */
static int channel_error_locked(struct dst *d)
{
	for (unsigned int i = 1; i < d->nr_ch; i++) {
		struct dst_channel *ch = &d->ch[i];

		if (ch->error && ch->error != -ECANCELED) {
			vmig_err_set(d->err, ch->error, "channel %u: %s", i,
				     ch->err.msg[0] ? ch->err.msg : strerror(-ch->error));
			return ch->error;
		}
	}
	vmig_err_set(d->err, -EPIPE, "a channel of the migration failed");
	return -EPIPE;
}

/*
 * Main connection's ITER_END(@iter): wait until every channel has applied
 * its share of the pass, then let them all go on.
 */
static int channels_barrier(struct dst *d, uint64_t iter)
{
	int ret = 0;

	if (d->nr_ch <= 1)
		return 0;
	pthread_mutex_lock(&d->ch_lock);
	for (;;) {
		bool all = true;

		if (d->ch_failed) {
			ret = channel_error_locked(d);
			break;
		}
		for (unsigned int i = 1; i < d->nr_ch; i++)
			if (d->ch[i].arrived < iter)
				all = false;
		if (all)
			break;
		pthread_cond_wait(&d->ch_cond, &d->ch_lock);
	}
	if (!ret) {
		d->released = iter;
		pthread_cond_broadcast(&d->ch_cond);
	}
	pthread_mutex_unlock(&d->ch_lock);
	return ret;
}

/* After SWITCHOVER: every channel must have ended with END. */
static int channels_finish(struct dst *d)
{
	int ret = 0;

	for (unsigned int i = 1; i < d->nr_ch; i++) {
		if (d->ch[i].started)
			pthread_join(d->ch[i].thread, NULL);
		d->ch[i].started = false;
	}
	pthread_mutex_lock(&d->ch_lock);
	for (unsigned int i = 1; i < d->nr_ch && !ret; i++)
		if (!d->ch[i].ended)
			ret = d->ch_failed ? channel_error_locked(d) : -EPROTO;
	if (ret == -EPROTO)
		vmig_err_set(d->err, -EPROTO, "a channel did not end with END");
	pthread_mutex_unlock(&d->ch_lock);
	return ret;
}

/*
 * After the last pass: every page that arrived torn (LIVE_PAGES: the
 * guest wrote it while it was sent) must have come again.  One that did
 * not was damaged on the way, not by the guest, and the VM would run
 * with it: fail, the source resumes.
 */
static int torn_check(struct dst *d)
{
	uint64_t n = 0, gpa = 0, g;

	for (unsigned int i = 0; i < d->nr_ch || i == 0; i++) {
		struct vmig_stream_reader *r = i ? d->ch[i].r : d->r;
		uint64_t k = r ? vmig_stream_reader_torn(r, &g) : 0;

		if (k && !n)
			gpa = g;
		n += k;
	}
	if (!n)
		return 0;
	vmig_err_set(d->err, -EBADMSG, "%" PRIu64 " page%s arrived damaged and %s never sent "
		     "again (one at gpa 0x%" PRIx64 "): the stream is corrupt", n,
		     n == 1 ? "" : "s", n == 1 ? "was" : "were", gpa);
	return -EBADMSG;
}

/* The readers' counts, summed, for the caller and the log. */
static void received_stats(struct dst *d, const struct vmig_dst_params *p)
{
	struct vmig_stream_stats sum = { 0 }, rs;

	for (unsigned int i = 0; i < d->nr_ch || i == 0; i++) {
		struct vmig_stream_reader *r = i ? d->ch[i].r : d->r;

		if (!r)
			continue;
		vmig_stream_reader_stats(r, &rs);
		sum.bytes += rs.bytes;
		sum.records += rs.records;
		sum.records_skipped += rs.records_skipped;
		sum.pages_zero += rs.pages_zero;
		sum.pages_raw += rs.pages_raw;
		sum.pages_lz4 += rs.pages_lz4;
		sum.pages_torn += rs.pages_torn;
	}
	if (sum.pages_torn)
		vmig_log(VMIG_LOG_DEBUG, "%" PRIu64 " pages arrived torn (written while sent) "
			 "and came again", sum.pages_torn);
	if (p->stats_out)
		*p->stats_out = sum;
}

/* Stop, join and close every channel.  NULL-safe on a half-built set. */
static void channels_stop(struct dst *d)
{
	pthread_mutex_lock(&d->ch_lock);
	d->ch_quit = true;
	pthread_cond_broadcast(&d->ch_cond);
	pthread_mutex_unlock(&d->ch_lock);
	for (unsigned int i = 1; i < VMIG_MIGRATE_MAX_CHANNELS; i++) {
		struct dst_channel *ch = &d->ch[i];

		if (ch->started) {
			if (vmig_transport_fd(ch->t) >= 0)
				shutdown(vmig_transport_fd(ch->t), SHUT_RDWR);
			pthread_join(ch->thread, NULL);
			ch->started = false;
		}
		vmig_stream_reader_destroy(ch->r);
		vmig_transport_close(ch->t);
		ch->r = NULL;
		ch->t = NULL;
	}
}

/*
 * CONFIG asked for channels: accept them on @p->listener, check that each
 * belongs to this migration (session) and start its thread.
 */
static int channels_accept(struct dst *d, const struct vmig_dst_params *p)
{
	unsigned int got = 0, tries = 0;
	struct vmig_record rec;
	int ret;

	d->nr_ch = d->cfg.channels;
	if (d->nr_ch <= 1)
		return 0;
	if (!p->listener && !p->accept_channel) {
		vmig_err_set(d->err, -ENOTSUP, "the source sends over %u connections, and this "
			     "destination takes one (use --channels 1 with this transport)",
			     d->nr_ch);
		return -ENOTSUP;
	}
	while (got < d->nr_ch - 1) {
		struct vmig_transport *t = NULL;
		struct vmig_stream_reader *r = NULL;
		struct vmig_err e = { 0 };
		uint64_t session;
		uint32_t index, count;

		if (++tries > 4 * d->nr_ch) {
			vmig_err_set(d->err, -EPROTO, "the source's channels did not arrive");
			return -EPROTO;
		}
		ret = p->listener ? vmig_transport_accept(p->listener, 10000, &t, &e) :
		      p->accept_channel(p->accept_arg, d->cfg.session, 15000, &t, &e);
		if (ret) {
			vmig_err_set(d->err, ret, "waiting for the source's channel %u of %u: %s",
				     got + 1, d->nr_ch, e.msg[0] ? e.msg : strerror(-ret));
			return ret;
		}
		vmig_transport_set_timeout(t, DST_IO_TIMEOUT_MS);
		ret = vmig_stream_reader_create(t, VMIG_STREAM_FORWARD, &r);
		if (!ret)
			ret = vmig_stream_read_header(r, &e);
		if (!ret)
			ret = vmig_stream_read_record(r, &rec, &e);
		if (!ret)
			ret = vmig_stream_parse_channel(&rec, &session, &index, &count, &e);
		if (!ret && (session != d->cfg.session || count != d->nr_ch ||
			     d->ch[index].t)) {
			vmig_err_set(&e, -EPROTO, "a connection for another migration");
			ret = -EPROTO;
		}
		if (ret) {
			/* Not one of ours (or garbage): drop it, keep waiting. */
			vmig_log(VMIG_LOG_WARN, "refused a connection while waiting for the "
				 "source's channels: %s", e.msg[0] ? e.msg : strerror(-ret));
			vmig_stream_reader_destroy(r);
			vmig_transport_close(t);
			continue;
		}
		d->ch[index].d = d;
		d->ch[index].index = index;
		d->ch[index].t = t;
		d->ch[index].r = r;
		got++;
	}
	for (unsigned int i = 1; i < d->nr_ch; i++) {
		ret = -pthread_create(&d->ch[i].thread, NULL, dst_channel_thread, &d->ch[i]);
		if (ret) {
			vmig_err_set(d->err, ret, "cannot start a channel thread: %s",
				     strerror(-ret));
			return ret;
		}
		d->ch[i].started = true;
	}
	return 0;
}

static void *populate_thread(void *arg)
{
	struct populate *pp = arg;
	uint64_t t0 = vmig__now_ns();

	for (size_t i = 0; i < pp->nr; i++) {
		for (uint64_t off = 0; off < pp->ranges[i].len; off += POPULATE_CHUNK) {
			uint64_t len = pp->ranges[i].len - off;

			if (atomic_load_explicit(&pp->stop, memory_order_relaxed))
				goto out;
			if (len > POPULATE_CHUNK)
				len = POPULATE_CHUNK;
			if (madvise(pp->ranges[i].hva + off, len, MADV_POPULATE_WRITE) < 0) {
				/* EINVAL: an older kernel; ENOMEM: the host is short.
				 * Either way the receiver faults pages in itself. */
				pp->error = errno;
				goto out;
			}
			pp->bytes += len;
		}
	}
out:
	pp->ns = vmig__now_ns() - t0;
	return NULL;
}

/* Join the populate thread, if any; log what it did. */
static void populate_stop(struct dst *d)
{
	struct populate *pp = &d->pop;

	if (pp->started) {
		atomic_store(&pp->stop, true);
		pthread_join(pp->thread, NULL);
		pp->started = false;
		vmig_log(VMIG_LOG_INFO, "faulted in %" PRIu64 " MiB of guest RAM ahead of the "
			 "pages in %" PRIu64 " ms%s%s", pp->bytes >> 20, pp->ns / 1000000,
			 pp->error ? ": stopped early: " : "",
			 pp->error ? strerror(pp->error) : "");
	}
	free(pp->ranges);
	pp->ranges = NULL;
	pp->nr = 0;
}

/* EXTENTS: start faulting those ranges in.  A hint: failures are ignored. */
static int populate_start(struct dst *d, const struct vmig_record *rec)
{
	const struct vmig_mem_region *r;
	unsigned int nr = vmig_vm_regions(d->vm, &r);
	struct vmig_stream_extent *e;
	struct populate *pp = &d->pop;
	uint32_t n, i;
	int ret;

	if (pp->started || pp->ranges)
		return 0;                          /* only the first one counts */
	e = malloc(VMIG_STREAM_MAX_EXTENTS * sizeof(*e));
	if (!e)
		return 0;
	ret = vmig_stream_parse_extents(rec, e, VMIG_STREAM_MAX_EXTENTS, &n, d->err);
	if (ret) {
		free(e);
		return ret;                        /* a corrupt stream: refuse it */
	}
	pp->ranges = calloc((size_t)n * nr, sizeof(*pp->ranges));
	if (!pp->ranges) {
		free(e);
		return 0;
	}
	/* Clip each extent to the RAM regions; what lies outside is ignored
	 * (pages there would be refused when they arrive). */
	for (i = 0; i < n; i++) {
		for (unsigned int k = 0; k < nr; k++) {
			uint64_t lo = e[i].gpa > r[k].gpa ? e[i].gpa : r[k].gpa;
			uint64_t hi = e[i].gpa + e[i].len < r[k].gpa + r[k].size ?
				      e[i].gpa + e[i].len : r[k].gpa + r[k].size;

			if (lo >= hi)
				continue;
			pp->ranges[pp->nr].hva = r[k].hva + (lo - r[k].gpa);
			pp->ranges[pp->nr].len = hi - lo;
			pp->nr++;
		}
	}
	free(e);
	atomic_init(&pp->stop, false);
	if (pp->nr && pthread_create(&pp->thread, NULL, populate_thread, pp) == 0)
		pp->started = true;
	return 0;
}

static void free_sections(struct dst *d)
{
	size_t i;

	for (i = 0; i < d->nr_sec; i++)
		free(d->sec[i].data);
	free(d->sec);
	d->sec = NULL;
	d->nr_sec = 0;
}

static int add_section(struct dst *d, const struct vmig_stream_state *st)
{
	struct section *s;
	size_t i;

	for (i = 0; i < d->nr_sec; i++)
		if (d->sec[i].instance == st->instance && !strcmp(d->sec[i].name, st->name)) {
			vmig_err_set(d->err, -EPROTO, "state section %s/%u arrived twice",
				     st->name, st->instance);
			return -EPROTO;
		}
	if (d->nr_sec == MAX_SECTIONS) {
		vmig_err_set(d->err, -EPROTO, "more than %u state sections", MAX_SECTIONS);
		return -EPROTO;
	}
	if (!d->sec) {
		d->sec = calloc(MAX_SECTIONS, sizeof(*d->sec));
		if (!d->sec)
			return -ENOMEM;
	}
	s = &d->sec[d->nr_sec];
	snprintf(s->name, sizeof(s->name), "%s", st->name);
	s->version = st->version;
	s->instance = st->instance;
	s->len = st->len;
	s->data = malloc(st->len ? st->len : 1);
	if (!s->data)
		return -ENOMEM;
	memcpy(s->data, st->data, st->len);
	d->nr_sec++;
	return 0;
}

static int load_state(struct dst *d)
{
	struct vmig_state_section *s = calloc(d->nr_sec ? d->nr_sec : 1, sizeof(*s));
	size_t i;
	int ret;

	if (!s)
		return -ENOMEM;
	for (i = 0; i < d->nr_sec; i++)
		s[i] = (struct vmig_state_section){ d->sec[i].name, d->sec[i].version,
						    d->sec[i].instance, d->sec[i].data,
						    d->sec[i].len };
	ret = vmig_vm_state_load(d->vm, s, d->nr_sec, d->err);
	free(s);
	return ret;
}

static int read_config(struct dst *d, const struct vmig_dst_params *p)
{
	struct vmig_vm_config vc = { 0 };
	struct json_object *o = NULL;
	struct vmig_record rec;
	int ret;

	ret = vmig_stream_read_header(d->r, d->err);
	if (ret)
		return ret;
	ret = vmig_stream_read_record(d->r, &rec, d->err);
	if (ret)
		return ret;
	if (rec.type != VMIG_REC_CONFIG) {
		vmig_err_set(d->err, -EPROTO, "the stream starts with %s, not CONFIG",
			     vmig_stream_rec_name(rec.type));
		return -EPROTO;
	}
	ret = vmig_stream_parse_config(&rec, &o, d->err);
	if (!ret)
		ret = vmig__config_parse(o, &d->cfg, d->err);
	if (!ret)
		ret = vmig__config_check_host(o, d->err);
	json_object_put(o);
	if (ret)
		return ret;
	if (p->name) {
		if (vmig_vm_name_valid(p->name) < 0) {
			vmig_err_set(d->err, -EINVAL, "bad VM name '%s'", p->name);
			return -EINVAL;
		}
		snprintf(d->cfg.name, sizeof(d->cfg.name), "%s", p->name);
	}
	if (p->claim) {
		ret = p->claim(p->claim_arg, d->cfg.name, d->err);
		if (ret)
			return ret;
	}
	vc.name = d->cfg.name;
	vc.mem_size = d->cfg.mem_size;
	vc.nr_vcpus = d->cfg.nr_vcpus;
	vc.workload = d->cfg.has_workload ? d->cfg.workload : NULL;
	vc.console_fd = p->console_fd;
	vc.incoming = true;
	vc.prealloc = p->prealloc;
	ret = vmig_vm_create(&vc, &d->vm, d->err);
	if (ret)
		return ret;
	return 0;
}

static int receive(struct dst *d, const struct vmig_dst_params *p)
{
	const struct vmig_mem_region *regions;
	unsigned int nr = vmig_vm_regions(d->vm, &regions);
	struct vmig_stream_state st;
	struct vmig_stream_stats rs;
	struct vmig_record rec;
	uint64_t iter, pages;
	char msg[512];
	int ret, e;

	ret = vmig_stream_reader_set_memory(d->r, regions, nr);
	if (ret) {
		vmig_err_set(d->err, ret, "out of memory");
		return ret;
	}
	for (;;) {
		if (p->check_abort) {
			ret = p->check_abort(p->check_arg, d->err);
			if (ret)
				return ret;
		}
		ret = vmig_stream_read_record(d->r, &rec, d->err);
		if (ret)
			return ret;
		switch (rec.type) {
		case VMIG_REC_PAGES:
		case VMIG_REC_LIVE_PAGES:
			break;        /* applied by the reader */
		case VMIG_REC_ITER_END:
			ret = vmig_stream_parse_iter_end(&rec, &iter, &pages, d->err);
			if (!ret)
				ret = channels_barrier(d, iter);
			if (ret)
				break;
			vmig_stream_reader_stats(d->r, &rs);
			if (d->w) {
				/* Tell the source this much has landed (its bandwidth
				 * figure and switchover wait on it). */
				uint64_t body[2] = { htole64(iter), htole64(rs.bytes) };

				/* A source that hung up is found by the next read,
				 * which also says why (ERROR record or end of stream). */
				if (vmig_stream_write_record(d->w, VMIG_REC_ITER_DONE, 0, body,
							     sizeof(body)) == 0)
					vmig_stream_flush(d->w);
			}
			if (p->progress)
				p->progress(p->progress_arg, iter, rs.bytes);
			break;
		case VMIG_REC_EXTENTS:
			ret = populate_start(d, &rec);
			break;
		case VMIG_REC_STATE:
			ret = vmig_stream_parse_state(&rec, &st, d->err);
			if (!ret)
				ret = add_section(d, &st);
			break;
		case VMIG_REC_SWITCHOVER:
			vmig_log(VMIG_LOG_DEBUG, "SWITCHOVER received at %" PRIu64 " us", vmig__now_ns() / 1000);
			populate_stop(d);     /* every page is here */
			ret = channels_finish(d);
			return ret ? ret : torn_check(d);
		case VMIG_REC_ERROR:
			ret = vmig_stream_parse_error(&rec, &e, msg, sizeof(msg), d->err);
			if (!ret) {
				vmig_err_set(d->err, e ? e : -ECANCELED,
					     "the source ended the migration: %s", msg);
				ret = e ? e : -ECANCELED;
			}
			break;
		default:
			vmig_err_set(d->err, -EPROTO, "unexpected %s record at offset %" PRIu64
				     " before the switchover",
				     vmig_stream_rec_name(rec.type), rec.offset);
			ret = -EPROTO;
		}
		if (ret)
			return ret;
	}
}

static int start_vm(struct dst *d, const struct vmig_dst_params *p)
{
	bool run = d->cfg.running || d->cfg.resume || p->resume;

	if (p->paused)
		run = false;
	return run ? vmig_vm_start(d->vm, d->err) : vmig_vm_start_paused(d->vm, d->err);
}

static int open_replies(struct dst *d)
{
	int ret;

	if (d->w)
		return 0;
	ret = vmig_stream_writer_create(d->t, VMIG_STREAM_REVERSE, &d->w);
	if (!ret)
		ret = vmig_stream_write_header(d->w);
	if (ret)
		vmig_err_set(d->err, ret, "cannot answer the source: %s", strerror(-ret));
	return ret;
}

int vmig_migrate_dst_run(struct vmig_transport *t, const struct vmig_dst_params *p,
			 struct vmig_vm **out, struct vmig_err *err)
{
	struct dst d = { .t = t, .err = err };
	struct vmig_record rec;
	bool committed = false, config_read = false;
	int ret;

	*out = NULL;
	pthread_mutex_init(&d.ch_lock, NULL);
	pthread_cond_init(&d.ch_cond, NULL);
	vmig_transport_set_timeout(t, DST_IO_TIMEOUT_MS);
	ret = vmig_stream_reader_create(t, VMIG_STREAM_FORWARD, &d.r);
	if (ret)
		return ret;
	ret = read_config(&d, p);
	config_read = !ret;
	if (!ret && d.cfg.live && !p->live) {
		vmig_err_set(err, -EPROTO, "this is a live migration stream and nothing can "
			     "answer it here (use vmig incoming)");
		ret = -EPROTO;
	}
	/* A live stream gets its replies on the same connection. */
	if (!ret && d.cfg.live)
		ret = open_replies(&d);
	if (!ret)
		ret = channels_accept(&d, p);
	if (!ret)
		ret = expose_ram(&d);
	if (!ret)
		ret = receive(&d, p);
	/* SWITCHOVER came after the source's last fence: every page is here. */
	unexpose_ram(&d);
	populate_stop(&d);
	received_stats(&d, p);
	channels_stop(&d);
	if (!ret)
		ret = load_state(&d);
	vmig_log(VMIG_LOG_DEBUG, "state loaded (%d) at %" PRIu64 " us", ret, vmig__now_ns() / 1000);
	if (!ret && d.vm) {
		struct vmig_guest_progress gp;

		/* Cheap sanity: a built-in guest's status page must have come along. */
		if (d.cfg.has_workload && vmig_guest_progress(d.vm, &gp) == 0 && !gp.present &&
		    d.cfg.running)
			vmig_log(VMIG_LOG_INFO, "the guest had not set up its status page yet");
	}
	if (ret)
		goto fail;

	if (!d.cfg.live) {
		ret = vmig_stream_read_record(d.r, &rec, err);
		if (!ret && rec.type != VMIG_REC_END) {
			vmig_err_set(err, -EPROTO, "expected END after the switchover, got %s",
				     vmig_stream_rec_name(rec.type));
			ret = -EPROTO;
		}
		if (!ret)
			ret = vmig_stream_expect_eof(d.r, err);
		if (!ret)
			ret = start_vm(&d, p);
		if (ret)
			goto fail;
		goto done;
	}

	if (p->check_abort) {
		ret = p->check_abort(p->check_arg, err);
		if (ret)
			goto fail;
	}
	/* Everything is loaded: tell the source, then wait for its decision. */
	ret = vmig_stream_write_record(d.w, VMIG_REC_READY, 0, NULL, 0);
	if (!ret)
		ret = vmig_stream_flush(d.w);
	if (ret) {
		vmig_err_set(err, ret, "cannot answer the source: %s", strerror(-ret));
		goto fail;
	}
	ret = vmig_stream_read_record(d.r, &rec, err);
	if (ret)
		goto fail;
	if (rec.type != VMIG_REC_COMMIT) {
		vmig_err_set(err, -EPROTO, "the source answered READY with %s",
			     vmig_stream_rec_name(rec.type));
		ret = -EPROTO;
		goto fail;
	}
	/* COMMIT: this side owns the VM now, whatever happens to the link. */
	committed = true;
	ret = start_vm(&d, p);
	if (ret)
		goto fail;
	if (vmig_stream_write_record(d.w, VMIG_REC_RUNNING, 0, NULL, 0) ||
	    vmig_stream_flush(d.w))
		vmig_log(VMIG_LOG_WARN, "could not tell the source the VM runs here; "
			 "it will report the handoff as uncertain");
done:
	free_sections(&d);
	vmig_stream_reader_destroy(d.r);
	vmig_stream_writer_destroy(d.w);
	pthread_cond_destroy(&d.ch_cond);
	pthread_mutex_destroy(&d.ch_lock);
	*out = d.vm;
	return 0;

fail:
	if (committed)
		vmig_log(VMIG_LOG_ERROR, "failed after COMMIT: %s", err->msg);
	/* Refuse out loud when the source can hear it (and may be waiting). */
	if (!committed && p->live && (!config_read || d.cfg.live))
		open_replies(&d);
	if (d.w && !committed) {
		vmig_stream_write_error(d.w, VMIG_REC_NACK, ret, "%s",
					err->msg[0] ? err->msg : strerror(-ret));
		vmig_stream_flush(d.w);
	}
	unexpose_ram(&d);
	populate_stop(&d);
	received_stats(&d, p);
	channels_stop(&d);
	free_sections(&d);
	vmig_stream_reader_destroy(d.r);
	vmig_stream_writer_destroy(d.w);
	vmig_vm_destroy(d.vm);
	pthread_cond_destroy(&d.ch_cond);
	pthread_mutex_destroy(&d.ch_lock);
	return ret;
}
