/*
 * The RDMA backend: rdma://HOST:PORT over one reliable-connected (RC)
 * queue pair, set up with librdmacm, driven with libibverbs.  Built with
 * --with-rdma.  Design and ordering rules: docs/rdma.md.
 *
 * Byte stream.  Each side registers a receive ring (RING_SIZE, 4 MiB)
 * and tells the peer its address and rkey in the connection's private
 * data.  A write copies the caller's bytes into a registered staging ring
 * at the same offset and posts an RDMA WRITE WITH IMMEDIATE into the
 * peer's ring; the immediate is the byte count.  Both sides derive ring
 * offsets from the running byte totals, so nothing else travels with the
 * data.  A write never wraps: it is cut at the end of the ring.
 *
 * Flow control.  Every WRITE WITH IMMEDIATE and every SEND consumes one
 * receive request at the peer; a writer may have at most RECV_DEPTH of
 * them unreported (data keeps CTRL_RESERVE of those for control messages)
 * and at most RING bytes the reader has not consumed.  The reader returns
 * both in small SENDs (struct rdma_msg) that carry running totals, so a
 * lost update is made good by the next one: when a quarter of the ring or
 * of the receive requests is free again, and whenever it is about to wait
 * with consumed bytes unreported (so neither side can wait on the other).
 * Control messages also carry the memory announcements (direct placement)
 * and the end of stream.
 *
 * Direct placement (transport.h): the destination registers guest RAM
 * and announces {gpa, len, addr, rkey}; the source copies pages into a
 * registered staging area and posts RDMA WRITEs there.  RC executes a
 * queue pair's requests in order, so a later copy of a page can never be
 * overtaken by an earlier one, and the stream record written after a
 * write lands after it.
 *
 * Threads: like the fd backend, one reading and one writing thread at a
 * time.  One mutex guards all state.  A thread that must wait either
 * becomes the poller (arms the CQ, sleeps in poll() on the completion
 * channel and the CM event channel) or, if the other thread polls already,
 * waits on a condition variable that the poller broadcasts after every
 * wake-up.
 *
 * A dead peer: a failed work completion (the peer's NIC stopped
 * acknowledging: retries exhausted) or a DISCONNECTED event makes the
 * connection dead.  Reads still return what arrived before; then they and
 * every write fail with -ECONNRESET and a message saying what happened.
 * A peer that just stops sending is caught by t->timeout_ms (-ETIMEDOUT).
 */
#include "config.h"

#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include "transport-internal.h"
#include "rdma-internal.h"

#define RDMA_MAGIC        0x564d4752u      /* "VMGR" */
#define RDMA_VERSION      1
#define RING_SIZE         (4u << 20)       /* receive ring, each side */
#define RING_MIN          (64u << 10)      /* limits for the peer's ring */
#define RING_MAX          (256u << 20)
#define CHUNK_MAX         (256u << 10)     /* largest single data write */
#define RECV_DEPTH        128              /* receive requests posted */
#define CTRL_RESERVE      8                /* of those, kept for control */
#define CTRL_SLOTS        16               /* control messages in flight */
#define SEND_DEPTH        256              /* send queue */
#define STAGE_SLOT        (64u << 10)      /* direct placement staging */
#define STAGE_SLOTS       32
#define CQ_DEPTH          (SEND_DEPTH + RECV_DEPTH + 16)
#define RESOLVE_MS        5000             /* address/route resolution */

/* Private data of the connect request and of its acceptance. */
struct rdma_hello {
	uint32_t magic;
	uint16_t version;
	uint16_t recv_depth;
	uint64_t ring_addr;
	uint32_t ring_rkey;
	uint32_t ring_len;
} __attribute__((packed));

enum msg_type {
	MSG_CREDIT = 1,       /* only the running totals */
	MSG_MR,               /* a region of guest memory */
	MSG_MR_DONE,          /* the list is complete (status 0) or declined */
	MSG_EOF,              /* no more bytes after these */
};

/* A control message (SEND).  Little-endian, every one carries credits. */
struct rdma_msg {
	uint32_t type;
	uint32_t rkey;        /* MR */
	uint64_t consumed;    /* bytes of the ring the sender has read, total */
	uint64_t recvs_done;  /* receive requests it has completed, total */
	uint64_t gpa;         /* MR */
	uint64_t len;         /* MR */
	uint64_t addr;        /* MR; MR_DONE: status as int64 */
};

#define MSG_SIZE 64       /* a receive slot */

/* wr_id: what a completion belongs to. */
enum { WR_RECV = 1, WR_DATA, WR_CTRL, WR_MEM };
#define WR_ID(kind, idx) (((uint64_t)(kind) << 32) | (uint32_t)(idx))

struct peer_region {
	uint64_t gpa, len, addr;
	uint32_t rkey;
};

struct rdma_transport {
	struct vmig_transport base;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool polling;                    /* a thread sleeps in poll() */

	struct rdma_event_channel *ch;
	struct rdma_cm_id *id;
	struct ibv_pd *pd;
	struct ibv_comp_channel *cc;
	struct ibv_cq *cq;
	bool qp_created, connected;
	int evfd;                        /* readable: data, EOF or dead */
	bool ev_set;

	/* receive side */
	char *ring;
	struct ibv_mr *ring_mr;
	uint32_t ring_len;
	char *recv_bufs;                 /* RECV_DEPTH * MSG_SIZE */
	struct ibv_mr *recv_mr;
	uint64_t rx_total;               /* bytes arrived in the ring */
	uint64_t rx_consumed;            /* bytes read by the caller */
	uint64_t recvs_done;             /* receive completions handled */
	uint64_t sent_consumed, sent_recvs_done;   /* last reported */
	bool rx_eof;
	uint64_t rx_eof_at;

	/* send side */
	char *stage;                     /* peer ring_len bytes */
	struct ibv_mr *stage_mr;
	uint64_t peer_ring_addr;
	uint32_t peer_ring_rkey, peer_ring_len, peer_recv_depth;
	uint64_t tx_total;               /* bytes posted */
	uint64_t tx_done;                /* bytes whose write completed */
	uint64_t peer_consumed, peer_recvs_done;
	uint64_t tx_msgs;                /* receive requests used at the peer */
	char *ctrl_bufs;                 /* CTRL_SLOTS * MSG_SIZE */
	struct ibv_mr *ctrl_mr;
	unsigned int ctrl_posted, ctrl_done;   /* slot ring counters */
	unsigned int sq_used;
	bool write_shut;

	/* direct placement: destination */
	struct ibv_mr *mem_mr[VMIG_TRANSPORT_MAX_MEM_REGIONS];
	unsigned int nr_mem_mr;
	bool mem_done_sent;
	/* direct placement: source */
	struct peer_region peer_mem[VMIG_TRANSPORT_MAX_MEM_REGIONS];
	unsigned int nr_peer_mem;
	int peer_mem_state;              /* 0 waiting, 1 usable, <0 declined */
	char *mem_stage;                 /* STAGE_SLOTS * STAGE_SLOT */
	struct ibv_mr *mem_stage_mr;
	unsigned int mem_posted, mem_done;

	int dead;                        /* -errno once the connection broke */
};

struct vmig__rdma_listener {
	struct rdma_event_channel *ch;
	struct rdma_cm_id *id;
	char uri[4200];
};

static struct rdma_transport *to_rdma(struct vmig_transport *t)
{
	return (struct rdma_transport *)t;
}

/* ------------------------------------------------------------------------
 * Small helpers
 */

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t deadline_after(int timeout_ms)
{
	return timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
}

static int remaining_ms(int64_t deadline)
{
	int64_t left;

	if (deadline < 0)
		return -1;
	left = deadline - now_ms();
	if (left < 0)
		return 0;
	return left > INT_MAX ? INT_MAX : (int)left;
}

static int set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	return 0;
}

/*
 * Is there an RDMA device at all?  Without one librdmacm fails with a
 * bare ENODEV, which tells an admin nothing.
 */
static int check_device(const char *what, const char *desc, struct vmig_err *err)
{
	struct ibv_device **list;
	int n = 0;

	errno = 0;
	list = ibv_get_device_list(&n);
	if (list)
		ibv_free_device_list(list);
	if (list && n > 0)
		return 0;
	vmig_err_set(err, -ENODEV,
		     "cannot %s %s: no RDMA device (ibv_get_device_list found none%s; "
		     "load the driver of an RDMA NIC, or soft-RoCE: modprobe rdma_rxe; "
		     "rdma link add rxe0 type rxe netdev IFACE)",
		     what, desc, errno == ENOSYS ? ": the kernel has no RDMA support loaded" : "");
	return -ENODEV;
}

int vmig_transport_rdma_check(struct vmig_err *err)
{
	return check_device("use", "rdma://", err);
}

static const char *cm_event_hint(int event)
{
	switch (event) {
	case RDMA_CM_EVENT_ADDR_ERROR:
		return "no RDMA device can reach that address (is it the address of an RDMA interface?)";
	case RDMA_CM_EVENT_ROUTE_ERROR:
		return "no route to the address over RDMA";
	case RDMA_CM_EVENT_UNREACHABLE:
		return "the peer is unreachable (no answer over RDMA)";
	case RDMA_CM_EVENT_REJECTED:
		return "connection rejected (is vmig incoming listening there with rdma://?)";
	case RDMA_CM_EVENT_CONNECT_ERROR:
		return "the connection failed while it was being set up";
	case RDMA_CM_EVENT_DEVICE_REMOVAL:
		return "the RDMA device was removed";
	case RDMA_CM_EVENT_DISCONNECTED:
		return "the peer disconnected";
	default:
		return "unexpected connection manager event";
	}
}

static int cm_event_errno(int event)
{
	switch (event) {
	case RDMA_CM_EVENT_ADDR_ERROR:
	case RDMA_CM_EVENT_ROUTE_ERROR:
	case RDMA_CM_EVENT_UNREACHABLE:
		return -EHOSTUNREACH;
	case RDMA_CM_EVENT_REJECTED:
		return -ECONNREFUSED;
	case RDMA_CM_EVENT_DEVICE_REMOVAL:
		return -ENODEV;
	default:
		return -ECONNRESET;
	}
}

/*
 * Wait for event @want on @ch until @deadline.  On success *@ev holds it
 * (the caller acks it); any other event is an error, with a message.
 */
static int cm_wait(struct rdma_event_channel *ch, enum rdma_cm_event_type want,
		   int64_t deadline, struct rdma_cm_event **ev, const char *what,
		   const char *desc, int timeout_ms, struct vmig_err *err)
{
	struct rdma_cm_event *e;
	int ret;

	for (;;) {
		if (rdma_get_cm_event(ch, &e) == 0)
			break;
		ret = -errno;
		if (ret != -EAGAIN && ret != -EINTR) {
			vmig_err_set(err, ret, "cannot %s %s: rdma_get_cm_event: %s", what, desc,
				     strerror(-ret));
			return ret;
		}
		ret = vmig__poll_one(ch->fd, POLLIN, remaining_ms(deadline));
		if (ret == -ETIMEDOUT) {
			vmig_err_set(err, ret, "cannot %s %s: no answer within %d ms "
				     "(check the address, the network and the RDMA link)",
				     what, desc, timeout_ms);
			return ret;
		}
		if (ret < 0) {
			vmig_err_set(err, ret, "cannot %s %s: %s", what, desc, strerror(-ret));
			return ret;
		}
	}
	if (e->event == want) {
		*ev = e;
		return 0;
	}
	ret = cm_event_errno(e->event);
	if (e->event == RDMA_CM_EVENT_REJECTED && e->status > 0)
		vmig_err_set(err, ret, "cannot %s %s: %s (reason %d)", what, desc,
			     cm_event_hint(e->event), e->status);
	else
		vmig_err_set(err, ret, "cannot %s %s: %s (%s, status %d)", what, desc,
			     cm_event_hint(e->event), rdma_event_str(e->event), e->status);
	rdma_ack_cm_event(e);
	return ret;
}

/* ------------------------------------------------------------------------
 * Completions and control messages (all with r->lock held)
 */

static void mark_dead(struct rdma_transport *r, int code, const char *fmt, ...)
	VMIG_PRINTF(3, 4);

static void mark_dead(struct rdma_transport *r, int code, const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	if (r->dead)
		return;
	r->dead = code;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	vmig__transport_fail(&r->base, code, "%s", msg);
}

static void update_evfd(struct rdma_transport *r)
{
	bool want = r->rx_total > r->rx_consumed || r->rx_eof || r->dead;
	uint64_t v = 1;

	if (want == r->ev_set)
		return;
	if (want) {
		if (write(r->evfd, &v, sizeof(v)) == sizeof(v))
			r->ev_set = true;
	} else {
		if (read(r->evfd, &v, sizeof(v)) == sizeof(v) || errno == EAGAIN)
			r->ev_set = false;
	}
}

static int post_recv(struct rdma_transport *r, unsigned int slot)
{
	struct ibv_sge sge = {
		.addr = (uintptr_t)(r->recv_bufs + (size_t)slot * MSG_SIZE),
		.length = MSG_SIZE,
		.lkey = r->recv_mr->lkey,
	};
	struct ibv_recv_wr wr = {
		.wr_id = WR_ID(WR_RECV, slot),
		.sg_list = &sge,
		.num_sge = 1,
	}, *bad;

	return -ibv_post_recv(r->id->qp, &wr, &bad);
}

static void take_msg(struct rdma_transport *r, const struct rdma_msg *m)
{
	uint64_t consumed = le64toh(m->consumed), done = le64toh(m->recvs_done);

	/* Running totals: only ever move forward, never past what we sent. */
	if (consumed > r->peer_consumed && consumed <= r->tx_total)
		r->peer_consumed = consumed;
	if (done > r->peer_recvs_done && done <= r->tx_msgs)
		r->peer_recvs_done = done;

	switch (le32toh(m->type)) {
	case MSG_CREDIT:
		break;
	case MSG_MR: {
		uint64_t gpa = le64toh(m->gpa), len = le64toh(m->len);

		if (r->peer_mem_state != 0 || r->nr_peer_mem >= VMIG_TRANSPORT_MAX_MEM_REGIONS ||
		    len == 0 || gpa + len < gpa) {
			mark_dead(r, -EPROTO, "the peer announced a bad memory region "
				  "(gpa 0x%" PRIx64 ", %" PRIu64 " bytes, %u before it)",
				  gpa, len, r->nr_peer_mem);
			break;
		}
		r->peer_mem[r->nr_peer_mem++] = (struct peer_region){
			.gpa = gpa, .len = len, .addr = le64toh(m->addr),
			.rkey = le32toh(m->rkey),
		};
		break;
	}
	case MSG_MR_DONE: {
		int64_t status = (int64_t)le64toh(m->addr);

		if (status < 0)
			r->peer_mem_state = status < -4095 ? -EIO : (int)status;
		else
			r->peer_mem_state = r->nr_peer_mem ? 1 : -EOPNOTSUPP;
		break;
	}
	case MSG_EOF:
		r->rx_eof = true;
		r->rx_eof_at = r->rx_total;
		break;
	default:
		mark_dead(r, -EPROTO, "unknown control message %u from the peer "
			  "(a different vmig version?)", le32toh(m->type));
		break;
	}
}

static const char *wc_what(uint64_t wr_id)
{
	switch (wr_id >> 32) {
	case WR_RECV: return "receive";
	case WR_DATA: return "stream write";
	case WR_CTRL: return "control message";
	case WR_MEM:  return "guest memory write";
	default:      return "work request";
	}
}

static void take_wc(struct rdma_transport *r, const struct ibv_wc *wc)
{
	unsigned int kind = (unsigned int)(wc->wr_id >> 32);
	unsigned int idx = (unsigned int)wc->wr_id;

	if (kind != WR_RECV)
		r->sq_used--;
	if (wc->status != IBV_WC_SUCCESS) {
		/*
		 * A flush follows the error (or disconnect) that broke the
		 * queue pair; the first failure says what happened.
		 */
		if (wc->status == IBV_WC_WR_FLUSH_ERR)
			mark_dead(r, -ECONNRESET, "the connection was closed (the peer failed "
				  "or gave up; %s flushed)", wc_what(wc->wr_id));
		else if (wc->status == IBV_WC_RETRY_EXC_ERR ||
			 wc->status == IBV_WC_RNR_RETRY_EXC_ERR)
			mark_dead(r, -ECONNRESET, "the peer stopped answering: %s failed: %s "
				  "(dead host or cut link?)", wc_what(wc->wr_id),
				  ibv_wc_status_str(wc->status));
		else
			mark_dead(r, -ECONNRESET, "%s failed: %s (work completion status %d)",
				  wc_what(wc->wr_id), ibv_wc_status_str(wc->status),
				  (int)wc->status);
		return;
	}
	switch (kind) {
	case WR_RECV:
		if (wc->opcode == IBV_WC_RECV_RDMA_WITH_IMM) {
			uint32_t n = ntohl(wc->imm_data);

			if (n == 0 || n > r->ring_len ||
			    r->rx_total + n - r->rx_consumed > r->ring_len) {
				mark_dead(r, -EPROTO, "the peer wrote %u bytes past the "
					  "receive ring (a broken peer)", n);
				return;
			}
			r->rx_total += n;
		} else if (wc->opcode == IBV_WC_RECV) {
			struct rdma_msg m;

			if (wc->byte_len < sizeof(m)) {
				mark_dead(r, -EPROTO, "a control message of %u bytes from the "
					  "peer is too short", wc->byte_len);
				return;
			}
			memcpy(&m, r->recv_bufs + (size_t)idx * MSG_SIZE, sizeof(m));
			take_msg(r, &m);
		}
		r->recvs_done++;
		if (idx >= RECV_DEPTH || post_recv(r, idx) < 0)
			mark_dead(r, -EIO, "cannot post a receive request");
		break;
	case WR_DATA:
		r->tx_done += idx;   /* the length posted (byte_len is for receives) */
		break;
	case WR_CTRL:
		r->ctrl_done++;
		break;
	case WR_MEM:
		r->mem_done++;
		break;
	}
}

/* Disconnects and the like on an established connection. */
static void take_cm_events(struct rdma_transport *r)
{
	struct rdma_cm_event *e;

	while (rdma_get_cm_event(r->ch, &e) == 0) {
		int ev = e->event;

		rdma_ack_cm_event(e);
		if (ev == RDMA_CM_EVENT_DISCONNECTED || ev == RDMA_CM_EVENT_DEVICE_REMOVAL ||
		    ev == RDMA_CM_EVENT_TIMEWAIT_EXIT) {
			if (ev == RDMA_CM_EVENT_DISCONNECTED)
				r->connected = false;
			mark_dead(r, ev == RDMA_CM_EVENT_DEVICE_REMOVAL ? -ENODEV : -ECONNRESET,
				  "%s%s", cm_event_hint(ev),
				  ev == RDMA_CM_EVENT_DISCONNECTED ?
				  " (it closed the connection, failed or gave up)" : "");
		}
	}
}

static int send_ctrl_locked(struct rdma_transport *r, uint32_t type, uint32_t rkey,
			    uint64_t gpa, uint64_t len, uint64_t addr);

/* Report freed ring space and receive requests when it is worth it. */
static void maybe_credit(struct rdma_transport *r, bool about_to_wait)
{
	bool bytes = r->rx_consumed - r->sent_consumed >= r->ring_len / 4 ||
		     (about_to_wait && r->rx_consumed > r->sent_consumed);
	bool recvs = r->recvs_done - r->sent_recvs_done >= RECV_DEPTH / 4;

	if (r->dead || (!bytes && !recvs))
		return;
	if (r->tx_msgs - r->peer_recvs_done >= r->peer_recv_depth ||
	    r->ctrl_posted - r->ctrl_done >= CTRL_SLOTS || r->sq_used >= SEND_DEPTH)
		return;   /* tried again after the next completion */
	send_ctrl_locked(r, MSG_CREDIT, 0, 0, 0, 0);
}

/*
 * Take in every CM event and completion there is; never blocks.  Events
 * first: the completions of what the peer sent before it disconnected
 * are queued before its disconnect arrives, and are reaped right after,
 * so a read still gets that data before the error.
 */
static void progress(struct rdma_transport *r)
{
	struct ibv_wc wc[16];
	int n;

	take_cm_events(r);
	do {
		n = ibv_poll_cq(r->cq, 16, wc);
		for (int i = 0; i < n; i++)
			take_wc(r, &wc[i]);
	} while (n == 16);
	if (n < 0)
		mark_dead(r, -EIO, "polling the completion queue failed");
	maybe_credit(r, false);
	update_evfd(r);
}

/*
 * Wait for something to happen (a completion, a CM event), at most until
 * @deadline.  Called with the lock held, returns with it held, after
 * progress().  0 or -ETIMEDOUT.
 */
static int wait_locked(struct rdma_transport *r, int64_t deadline)
{
	int ret = 0;

	maybe_credit(r, true);
	if (!r->polling) {
		struct pollfd p[2] = {
			{ .fd = r->cc->fd, .events = POLLIN },
			{ .fd = r->ch->fd, .events = POLLIN },
		};
		int n;

		if (ibv_req_notify_cq(r->cq, 0)) {
			mark_dead(r, -EIO, "cannot arm the completion queue");
			return 0;
		}
		/* A completion that came before the arming raises no event. */
		{
			struct ibv_wc wc;

			n = ibv_poll_cq(r->cq, 1, &wc);
			if (n > 0) {
				take_wc(r, &wc);
				progress(r);
				return 0;
			}
		}
		r->polling = true;
		pthread_mutex_unlock(&r->lock);
		n = poll(p, 2, remaining_ms(deadline));
		pthread_mutex_lock(&r->lock);
		r->polling = false;
		if (n == 0)
			ret = -ETIMEDOUT;
		if (n > 0 && (p[0].revents & POLLIN)) {
			struct ibv_cq *cq;
			void *ctx;

			if (ibv_get_cq_event(r->cc, &cq, &ctx) == 0)
				ibv_ack_cq_events(cq, 1);
		}
		progress(r);
		pthread_cond_broadcast(&r->cond);
		return ret;
	}
	/* The other thread polls; it broadcasts after each wake-up. */
	if (deadline < 0) {
		pthread_cond_wait(&r->cond, &r->lock);
	} else {
		struct timespec ts;
		int64_t left = remaining_ms(deadline);

		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += left / 1000;
		ts.tv_nsec += (left % 1000) * 1000000;
		if (ts.tv_nsec >= 1000000000) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000;
		}
		if (pthread_cond_timedwait(&r->cond, &r->lock, &ts) == ETIMEDOUT)
			ret = -ETIMEDOUT;
	}
	progress(r);
	return ret;
}

static bool ctrl_room(const struct rdma_transport *r)
{
	return r->tx_msgs - r->peer_recvs_done < r->peer_recv_depth &&
	       r->ctrl_posted - r->ctrl_done < CTRL_SLOTS && r->sq_used < SEND_DEPTH;
}

/* Post one control message; the caller made sure there is room. */
static int send_ctrl_locked(struct rdma_transport *r, uint32_t type, uint32_t rkey,
			    uint64_t gpa, uint64_t len, uint64_t addr)
{
	unsigned int slot = r->ctrl_posted % CTRL_SLOTS;
	struct rdma_msg *m = (struct rdma_msg *)(r->ctrl_bufs + (size_t)slot * MSG_SIZE);
	struct ibv_sge sge = {
		.addr = (uintptr_t)m,
		.length = sizeof(*m),
		.lkey = r->ctrl_mr->lkey,
	};
	struct ibv_send_wr wr = {
		.wr_id = WR_ID(WR_CTRL, slot),
		.sg_list = &sge,
		.num_sge = 1,
		.opcode = IBV_WR_SEND,
		.send_flags = IBV_SEND_SIGNALED,
	}, *bad;
	int ret;

	*m = (struct rdma_msg){
		.type = htole32(type),
		.rkey = htole32(rkey),
		.consumed = htole64(r->rx_consumed),
		.recvs_done = htole64(r->recvs_done),
		.gpa = htole64(gpa),
		.len = htole64(len),
		.addr = htole64(addr),
	};
	ret = -ibv_post_send(r->id->qp, &wr, &bad);
	if (ret) {
		mark_dead(r, ret, "cannot post a control message: %s", strerror(-ret));
		return ret;
	}
	r->ctrl_posted++;
	r->sq_used++;
	r->tx_msgs++;
	r->sent_consumed = r->rx_consumed;
	r->sent_recvs_done = r->recvs_done;
	return 0;
}

/* Send a control message, waiting for room up to the timeout. */
static int send_ctrl(struct rdma_transport *r, uint32_t type, uint32_t rkey,
		     uint64_t gpa, uint64_t len, uint64_t addr)
{
	int64_t deadline = deadline_after(r->base.timeout_ms);

	progress(r);
	while (!r->dead && !ctrl_room(r)) {
		if (wait_locked(r, deadline) == -ETIMEDOUT && !ctrl_room(r)) {
			mark_dead(r, -ETIMEDOUT, "could not send for %d ms (the peer stopped "
				  "reading: dead host or cut link?)", r->base.timeout_ms);
			break;
		}
	}
	if (r->dead)
		return r->dead;
	return send_ctrl_locked(r, type, rkey, gpa, len, addr);
}

/* ------------------------------------------------------------------------
 * The byte stream
 */

static ssize_t rdma_read(struct vmig_transport *t, void *buf, size_t len)
{
	struct rdma_transport *r = to_rdma(t);
	int64_t deadline = deadline_after(t->timeout_ms);
	ssize_t ret;

	pthread_mutex_lock(&r->lock);
	progress(r);
	for (;;) {
		uint64_t avail = r->rx_total - r->rx_consumed;

		if (avail) {
			uint32_t off = (uint32_t)(r->rx_consumed % r->ring_len);
			size_t n = len;

			if (n > avail)
				n = (size_t)avail;
			if (n > r->ring_len - off)
				n = r->ring_len - off;
			memcpy(buf, r->ring + off, n);
			r->rx_consumed += n;
			maybe_credit(r, false);
			update_evfd(r);
			ret = (ssize_t)n;
			break;
		}
		if (r->rx_eof && r->rx_consumed >= r->rx_eof_at) {
			ret = 0;
			break;
		}
		if (r->dead) {
			ret = r->dead;
			break;
		}
		if (wait_locked(r, deadline) == -ETIMEDOUT &&
		    r->rx_total == r->rx_consumed && !r->rx_eof && !r->dead) {
			/* Not fatal to the connection: the caller decides. */
			vmig__transport_fail(t, -ETIMEDOUT, "no data for %d ms (the peer "
					     "stopped sending: dead host or cut link?)",
					     t->timeout_ms);
			ret = -ETIMEDOUT;
			break;
		}
	}
	pthread_mutex_unlock(&r->lock);
	return ret;
}

static uint64_t write_room(const struct rdma_transport *r)
{
	uint64_t ring = r->peer_ring_len;
	uint64_t by_peer = ring - (r->tx_total - r->peer_consumed);
	uint64_t by_stage = ring - (r->tx_total - r->tx_done);

	if (r->tx_msgs - r->peer_recvs_done >= r->peer_recv_depth - CTRL_RESERVE ||
	    r->sq_used >= SEND_DEPTH - 1)
		return 0;
	return by_peer < by_stage ? by_peer : by_stage;
}

static ssize_t rdma_write(struct vmig_transport *t, const void *buf, size_t len)
{
	struct rdma_transport *r = to_rdma(t);
	int64_t deadline = deadline_after(t->timeout_ms);
	ssize_t ret;

	pthread_mutex_lock(&r->lock);
	if (r->write_shut) {
		pthread_mutex_unlock(&r->lock);
		vmig__transport_fail(t, -EPIPE, "write after shutdown");
		return -EPIPE;
	}
	progress(r);
	for (;;) {
		uint64_t room;

		if (r->dead) {
			ret = r->dead;
			break;
		}
		room = write_room(r);
		if (room) {
			uint32_t off = (uint32_t)(r->tx_total % r->peer_ring_len);
			size_t n = len;
			struct ibv_sge sge;
			struct ibv_send_wr wr, *bad;
			int pret;

			if (n > room)
				n = (size_t)room;
			if (n > r->peer_ring_len - off)
				n = r->peer_ring_len - off;
			if (n > CHUNK_MAX)
				n = CHUNK_MAX;
			memcpy(r->stage + off, buf, n);
			sge = (struct ibv_sge){
				.addr = (uintptr_t)(r->stage + off),
				.length = (uint32_t)n,
				.lkey = r->stage_mr->lkey,
			};
			wr = (struct ibv_send_wr){
				.wr_id = WR_ID(WR_DATA, n),
				.sg_list = &sge,
				.num_sge = 1,
				.opcode = IBV_WR_RDMA_WRITE_WITH_IMM,
				.send_flags = IBV_SEND_SIGNALED,
				.imm_data = htonl((uint32_t)n),
				.wr.rdma = {
					.remote_addr = r->peer_ring_addr + off,
					.rkey = r->peer_ring_rkey,
				},
			};
			pret = ibv_post_send(r->id->qp, &wr, &bad);
			if (pret) {
				mark_dead(r, -pret, "cannot post a write: %s", strerror(pret));
				ret = -pret;
				break;
			}
			r->tx_total += n;
			r->tx_msgs++;
			r->sq_used++;
			ret = (ssize_t)n;
			break;
		}
		if (wait_locked(r, deadline) == -ETIMEDOUT && !write_room(r) && !r->dead) {
			mark_dead(r, -ETIMEDOUT, "could not write for %d ms (the peer stopped "
				  "reading: dead host or cut link?)", t->timeout_ms);
			ret = -ETIMEDOUT;
			break;
		}
	}
	pthread_mutex_unlock(&r->lock);
	return ret;
}

static int rdma_shutdown_write(struct vmig_transport *t)
{
	struct rdma_transport *r = to_rdma(t);
	int ret = 0;

	pthread_mutex_lock(&r->lock);
	if (!r->write_shut) {
		ret = send_ctrl(r, MSG_EOF, 0, 0, 0, 0);
		if (!ret)
			r->write_shut = true;
	}
	pthread_mutex_unlock(&r->lock);
	return ret;
}

static int rdma_set_timeout(struct vmig_transport *t)
{
	return 0;   /* every wait uses t->timeout_ms */
}

static int rdma_fd(struct vmig_transport *t)
{
	struct rdma_transport *r = to_rdma(t);

	pthread_mutex_lock(&r->lock);
	progress(r);
	pthread_mutex_unlock(&r->lock);
	return r->evfd;
}

/* ------------------------------------------------------------------------
 * Direct placement
 */

static int rdma_expose(struct vmig_transport *t, void *hva, size_t len, uint64_t gpa)
{
	struct rdma_transport *r = to_rdma(t);
	struct ibv_mr *mr;
	int ret;

	/* The caller's mistakes: reported, but the connection is fine. */
	if (!hva || !len || ((uintptr_t)hva | len) & 4095 || gpa + len < gpa)
		return -EINVAL;
	pthread_mutex_lock(&r->lock);
	if (r->mem_done_sent) {
		ret = -EINVAL;
		goto out;
	}
	if (r->nr_mem_mr >= VMIG_TRANSPORT_MAX_MEM_REGIONS) {
		ret = -E2BIG;
		goto out;
	}
	mr = ibv_reg_mr(r->pd, hva, len, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
	if (!mr) {
		ret = errno ? -errno : -ENOMEM;
		vmig__transport_fail(t, ret, "cannot register %zu bytes of guest memory at gpa "
				     "0x%" PRIx64 " with the RDMA device: %s%s", len, gpa,
				     strerror(-ret), ret == -ENOMEM || ret == -EPERM ?
				     " (pinned memory is limited by RLIMIT_MEMLOCK: ulimit -l)" : "");
		goto out;
	}
	r->mem_mr[r->nr_mem_mr++] = mr;
	ret = send_ctrl(r, MSG_MR, mr->rkey, gpa, len, (uintptr_t)hva);
out:
	pthread_mutex_unlock(&r->lock);
	return ret;
}

static int rdma_expose_done(struct vmig_transport *t, int status)
{
	struct rdma_transport *r = to_rdma(t);
	int ret;

	pthread_mutex_lock(&r->lock);
	if (status >= 0 && !r->nr_mem_mr)
		status = -EOPNOTSUPP;
	ret = send_ctrl(r, MSG_MR_DONE, 0, 0, 0, (uint64_t)(int64_t)(status < 0 ? status : 0));
	if (!ret)
		r->mem_done_sent = true;
	pthread_mutex_unlock(&r->lock);
	return ret;
}

static void unexpose_locked(struct rdma_transport *r)
{
	while (r->nr_mem_mr)
		ibv_dereg_mr(r->mem_mr[--r->nr_mem_mr]);
}

static int rdma_unexpose(struct vmig_transport *t)
{
	struct rdma_transport *r = to_rdma(t);

	pthread_mutex_lock(&r->lock);
	unexpose_locked(r);
	pthread_mutex_unlock(&r->lock);
	return 0;
}

static int rdma_peer_memory(struct vmig_transport *t, int timeout_ms)
{
	struct rdma_transport *r = to_rdma(t);
	int64_t deadline = deadline_after(timeout_ms < 0 ? t->timeout_ms : timeout_ms);
	int ret;

	pthread_mutex_lock(&r->lock);
	progress(r);
	while (!r->peer_mem_state && !r->dead) {
		if (wait_locked(r, deadline) == -ETIMEDOUT && !r->peer_mem_state) {
			pthread_mutex_unlock(&r->lock);
			vmig__transport_fail(t, -ETIMEDOUT, "the destination did not say "
					     "within %d ms whether it takes pages by RDMA WRITE",
					     timeout_ms < 0 ? t->timeout_ms : timeout_ms);
			return -ETIMEDOUT;
		}
	}
	if (r->peer_mem_state > 0)
		ret = 0;
	else
		ret = r->peer_mem_state < 0 ? -EOPNOTSUPP : r->dead;
	if (!r->mem_stage && !ret) {
		r->mem_stage = aligned_alloc(4096, (size_t)STAGE_SLOTS * STAGE_SLOT);
		if (r->mem_stage)
			r->mem_stage_mr = ibv_reg_mr(r->pd, r->mem_stage,
						     (size_t)STAGE_SLOTS * STAGE_SLOT,
						     IBV_ACCESS_LOCAL_WRITE);
		if (!r->mem_stage_mr) {
			ret = -ENOMEM;
			vmig__transport_fail(t, ret, "cannot register the staging area for "
					     "guest memory writes");
		}
	}
	pthread_mutex_unlock(&r->lock);
	return ret;
}

static const struct peer_region *find_region(const struct rdma_transport *r,
					     uint64_t gpa, size_t len)
{
	for (unsigned int i = 0; i < r->nr_peer_mem; i++) {
		const struct peer_region *p = &r->peer_mem[i];

		if (gpa >= p->gpa && gpa - p->gpa <= p->len && len <= p->len - (gpa - p->gpa))
			return p;
	}
	return NULL;
}

static int rdma_write_mem(struct vmig_transport *t, uint64_t gpa, const void *src,
			  size_t len)
{
	struct rdma_transport *r = to_rdma(t);
	int64_t deadline = deadline_after(t->timeout_ms);
	const struct peer_region *p;
	const char *s = src;
	int ret = 0;

	pthread_mutex_lock(&r->lock);
	/* The caller's mistakes: reported, but the connection is fine. */
	if (r->peer_mem_state <= 0 || !r->mem_stage_mr) {
		pthread_mutex_unlock(&r->lock);
		return -EOPNOTSUPP;
	}
	p = find_region(r, gpa, len);
	if (!p) {
		pthread_mutex_unlock(&r->lock);
		return -ERANGE;
	}
	while (len) {
		size_t n = len < STAGE_SLOT ? len : STAGE_SLOT;
		unsigned int slot;
		char *dst;
		struct ibv_sge sge;
		struct ibv_send_wr wr, *bad;

		if (r->dead) {
			ret = r->dead;
			break;
		}
		if (r->mem_posted - r->mem_done >= STAGE_SLOTS || r->sq_used >= SEND_DEPTH - 1) {
			if (wait_locked(r, deadline) == -ETIMEDOUT && !r->dead &&
			    r->mem_posted - r->mem_done >= STAGE_SLOTS) {
				mark_dead(r, -ETIMEDOUT, "guest memory writes not acknowledged "
					  "for %d ms (dead host or cut link?)", t->timeout_ms);
				ret = -ETIMEDOUT;
				break;
			}
			continue;
		}
		slot = r->mem_posted % STAGE_SLOTS;
		dst = r->mem_stage + (size_t)slot * STAGE_SLOT;
		memcpy(dst, s, n);
		sge = (struct ibv_sge){
			.addr = (uintptr_t)dst,
			.length = (uint32_t)n,
			.lkey = r->mem_stage_mr->lkey,
		};
		wr = (struct ibv_send_wr){
			.wr_id = WR_ID(WR_MEM, slot),
			.sg_list = &sge,
			.num_sge = 1,
			.opcode = IBV_WR_RDMA_WRITE,
			.send_flags = IBV_SEND_SIGNALED,
			.wr.rdma = {
				.remote_addr = p->addr + (gpa - p->gpa),
				.rkey = p->rkey,
			},
		};
		ret = ibv_post_send(r->id->qp, &wr, &bad);
		if (ret) {
			mark_dead(r, -ret, "cannot post a guest memory write: %s", strerror(ret));
			ret = -ret;
			break;
		}
		r->mem_posted++;
		r->sq_used++;
		gpa += n;
		s += n;
		len -= n;
	}
	pthread_mutex_unlock(&r->lock);
	return ret;
}

static int rdma_fence(struct vmig_transport *t)
{
	struct rdma_transport *r = to_rdma(t);
	int64_t deadline = deadline_after(t->timeout_ms);
	int ret = 0;

	pthread_mutex_lock(&r->lock);
	progress(r);
	while (r->mem_done != r->mem_posted && !r->dead) {
		if (wait_locked(r, deadline) == -ETIMEDOUT && r->mem_done != r->mem_posted &&
		    !r->dead) {
			mark_dead(r, -ETIMEDOUT, "%u guest memory writes not acknowledged for "
				  "%d ms (dead host or cut link?)", r->mem_posted - r->mem_done,
				  t->timeout_ms);
		}
	}
	if (r->dead)
		ret = r->dead;
	pthread_mutex_unlock(&r->lock);
	return ret;
}

static void rdma_close(struct vmig_transport *t);

static const struct vmig_transport_mem_ops rdma_mem_ops = {
	.expose = rdma_expose,
	.expose_done = rdma_expose_done,
	.unexpose = rdma_unexpose,
	.peer_memory = rdma_peer_memory,
	.write_mem = rdma_write_mem,
	.fence = rdma_fence,
};

static const struct vmig_transport_ops rdma_ops = {
	.kind = "rdma",
	.read = rdma_read,
	.write = rdma_write,
	.shutdown_write = rdma_shutdown_write,
	.set_timeout = rdma_set_timeout,
	.close = rdma_close,
	.fd = rdma_fd,
	.mem = &rdma_mem_ops,
};

/* ------------------------------------------------------------------------
 * Set-up and tear-down
 */

/*
 * Requests still in the send queue are flushed, not sent, once the
 * connection is torn down: let them finish first (like close() on a
 * socket with data in its buffer), for a bounded time.
 */
static void drain_sends(struct rdma_transport *r)
{
	int limit = r->base.timeout_ms < 0 || r->base.timeout_ms > RESOLVE_MS ?
		    RESOLVE_MS : r->base.timeout_ms;
	int64_t deadline = deadline_after(limit);

	pthread_mutex_lock(&r->lock);
	progress(r);
	while (r->sq_used && !r->dead && remaining_ms(deadline) > 0)
		wait_locked(r, deadline);
	pthread_mutex_unlock(&r->lock);
}

static void rdma_close(struct vmig_transport *t)
{
	struct rdma_transport *r = to_rdma(t);

	if (r->connected && r->cq)
		drain_sends(r);
	if (r->connected && r->id)
		rdma_disconnect(r->id);
	unexpose_locked(r);
	if (r->qp_created)
		rdma_destroy_qp(r->id);
	if (r->mem_stage_mr)
		ibv_dereg_mr(r->mem_stage_mr);
	if (r->stage_mr)
		ibv_dereg_mr(r->stage_mr);
	if (r->ctrl_mr)
		ibv_dereg_mr(r->ctrl_mr);
	if (r->recv_mr)
		ibv_dereg_mr(r->recv_mr);
	if (r->ring_mr)
		ibv_dereg_mr(r->ring_mr);
	if (r->cq)
		ibv_destroy_cq(r->cq);
	if (r->cc)
		ibv_destroy_comp_channel(r->cc);
	if (r->pd)
		ibv_dealloc_pd(r->pd);
	if (r->id)
		rdma_destroy_id(r->id);
	if (r->ch)
		rdma_destroy_event_channel(r->ch);
	if (r->evfd >= 0)
		close(r->evfd);
	free(r->mem_stage);
	free(r->stage);
	free(r->ctrl_bufs);
	free(r->recv_bufs);
	free(r->ring);
	pthread_cond_destroy(&r->cond);
	pthread_mutex_destroy(&r->lock);
	free(r);
}

static struct rdma_transport *rdma_new(const char *desc)
{
	struct rdma_transport *r = calloc(1, sizeof(*r));

	if (!r)
		return NULL;
	vmig_transport_init(&r->base, &rdma_ops, desc);
	pthread_mutex_init(&r->lock, NULL);
	pthread_cond_init(&r->cond, NULL);
	r->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (r->evfd < 0) {
		rdma_close(&r->base);
		return NULL;
	}
	return r;
}

static struct ibv_mr *alloc_mr(struct ibv_pd *pd, char **buf, size_t len, int access)
{
	*buf = aligned_alloc(4096, (len + 4095) & ~(size_t)4095);
	if (!*buf)
		return NULL;
	memset(*buf, 0, len);
	return ibv_reg_mr(pd, *buf, len, access);
}

/*
 * Resources on r->id (address resolved, or a connect request): protection
 * domain, CQ with its channel, the QP, the ring and buffers, and every
 * receive request posted (before the peer can send).
 */
static int setup_qp(struct rdma_transport *r, const char *what, struct vmig_err *err)
{
	struct ibv_qp_init_attr qa = {
		.qp_type = IBV_QPT_RC,
		.cap = {
			.max_send_wr = SEND_DEPTH,
			.max_recv_wr = RECV_DEPTH,
			.max_send_sge = 1,
			.max_recv_sge = 1,
		},
	};
	const char *step;
	int ret;

	step = "allocate a protection domain";
	r->pd = ibv_alloc_pd(r->id->verbs);
	if (!r->pd)
		goto fail;
	step = "create a completion channel";
	r->cc = ibv_create_comp_channel(r->id->verbs);
	if (!r->cc || set_nonblock(r->cc->fd) < 0)
		goto fail;
	step = "create a completion queue";
	r->cq = ibv_create_cq(r->id->verbs, CQ_DEPTH, NULL, r->cc, 0);
	if (!r->cq)
		goto fail;
	qa.send_cq = qa.recv_cq = r->cq;
	step = "create a queue pair";
	if (rdma_create_qp(r->id, r->pd, &qa))
		goto fail;
	r->qp_created = true;
	step = "register the receive ring";
	r->ring_len = RING_SIZE;
	r->ring_mr = alloc_mr(r->pd, &r->ring, RING_SIZE,
			      IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
	if (!r->ring_mr)
		goto fail;
	step = "register the message buffers";
	r->recv_mr = alloc_mr(r->pd, &r->recv_bufs, (size_t)RECV_DEPTH * MSG_SIZE,
			      IBV_ACCESS_LOCAL_WRITE);
	if (!r->recv_mr)
		goto fail;
	r->ctrl_mr = alloc_mr(r->pd, &r->ctrl_bufs, (size_t)CTRL_SLOTS * MSG_SIZE,
			      IBV_ACCESS_LOCAL_WRITE);
	if (!r->ctrl_mr)
		goto fail;
	step = "post receive requests";
	for (unsigned int i = 0; i < RECV_DEPTH; i++) {
		ret = post_recv(r, i);
		if (ret < 0) {
			errno = -ret;
			goto fail;
		}
	}
	return 0;
fail:
	ret = errno ? -errno : -ENOMEM;
	vmig_err_set(err, ret, "cannot %s %s: cannot %s: %s%s", what, r->base.desc, step,
		     strerror(-ret), ret == -ENOMEM || ret == -EPERM ?
		     " (pinned memory is limited by RLIMIT_MEMLOCK: ulimit -l)" : "");
	return ret;
}

static void fill_hello(const struct rdma_transport *r, struct rdma_hello *h)
{
	*h = (struct rdma_hello){
		.magic = htole32(RDMA_MAGIC),
		.version = htole16(RDMA_VERSION),
		.recv_depth = htole16(RECV_DEPTH),
		.ring_addr = htole64((uintptr_t)r->ring),
		.ring_rkey = htole32(r->ring_mr->rkey),
		.ring_len = htole32(r->ring_len),
	};
}

/* The peer's hello: check it, then allocate the staging ring to match. */
static int take_hello(struct rdma_transport *r, const void *data, uint8_t len,
		      const char *what, struct vmig_err *err)
{
	struct rdma_hello h;

	if (!data || len < sizeof(h)) {
		vmig_err_set(err, -EPROTO, "cannot %s %s: the peer is not vmig "
			     "(%u bytes of connection data)", what, r->base.desc, len);
		return -EPROTO;
	}
	memcpy(&h, data, sizeof(h));
	if (le32toh(h.magic) != RDMA_MAGIC) {
		vmig_err_set(err, -EPROTO, "cannot %s %s: the peer is not vmig", what,
			     r->base.desc);
		return -EPROTO;
	}
	if (le16toh(h.version) != RDMA_VERSION) {
		vmig_err_set(err, -EPROTO, "cannot %s %s: the peer speaks RDMA transport "
			     "version %u, this vmig %u", what, r->base.desc,
			     le16toh(h.version), RDMA_VERSION);
		return -EPROTO;
	}
	r->peer_ring_addr = le64toh(h.ring_addr);
	r->peer_ring_rkey = le32toh(h.ring_rkey);
	r->peer_ring_len = le32toh(h.ring_len);
	r->peer_recv_depth = le16toh(h.recv_depth);
	if (r->peer_ring_len < RING_MIN || r->peer_ring_len > RING_MAX ||
	    r->peer_recv_depth <= CTRL_RESERVE * 2) {
		vmig_err_set(err, -EPROTO, "cannot %s %s: the peer offers a ring of %u bytes "
			     "and %u receive requests", what, r->base.desc, r->peer_ring_len,
			     r->peer_recv_depth);
		return -EPROTO;
	}
	r->stage_mr = alloc_mr(r->pd, &r->stage, r->peer_ring_len, IBV_ACCESS_LOCAL_WRITE);
	if (!r->stage_mr) {
		int ret = errno ? -errno : -ENOMEM;

		vmig_err_set(err, ret, "cannot %s %s: cannot register the send ring: %s",
			     what, r->base.desc, strerror(-ret));
		return ret;
	}
	return 0;
}

static void conn_param(struct rdma_conn_param *p, const struct rdma_hello *h)
{
	*p = (struct rdma_conn_param){
		.private_data = h,
		.private_data_len = sizeof(*h),
		.responder_resources = 0,   /* no RDMA READs */
		.initiator_depth = 0,
		.retry_count = 7,           /* then the peer is taken for dead */
		.rnr_retry_count = 7,       /* receive requests are credited: rare */
	};
}

static int connect_addr(struct rdma_transport *r, const struct addrinfo *ai,
			int64_t deadline, int timeout_ms, struct vmig_err *err)
{
	const char *desc = r->base.desc;
	struct rdma_cm_event *ev;
	struct rdma_conn_param cp;
	struct rdma_hello h;
	int resolve = timeout_ms < 0 || timeout_ms > RESOLVE_MS ? RESOLVE_MS : timeout_ms;
	int ret;

	if (rdma_create_id(r->ch, &r->id, r, RDMA_PS_TCP)) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot connect to %s: rdma_create_id: %s", desc,
			     strerror(-ret));
		return ret;
	}
	if (rdma_resolve_addr(r->id, NULL, ai->ai_addr, resolve ? resolve : 1)) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot connect to %s: %s%s", desc, strerror(-ret),
			     ret == -ENODEV || ret == -EADDRNOTAVAIL ?
			     " (no RDMA device serves a route to that address)" : "");
		return ret;
	}
	ret = cm_wait(r->ch, RDMA_CM_EVENT_ADDR_RESOLVED, deadline, &ev, "connect to", desc,
		      timeout_ms, err);
	if (ret)
		return ret;
	rdma_ack_cm_event(ev);
	if (rdma_resolve_route(r->id, resolve ? resolve : 1)) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot connect to %s: rdma_resolve_route: %s", desc,
			     strerror(-ret));
		return ret;
	}
	ret = cm_wait(r->ch, RDMA_CM_EVENT_ROUTE_RESOLVED, deadline, &ev, "connect to", desc,
		      timeout_ms, err);
	if (ret)
		return ret;
	rdma_ack_cm_event(ev);
	ret = setup_qp(r, "connect to", err);
	if (ret)
		return ret;
	fill_hello(r, &h);
	conn_param(&cp, &h);
	if (rdma_connect(r->id, &cp)) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot connect to %s: rdma_connect: %s", desc,
			     strerror(-ret));
		return ret;
	}
	ret = cm_wait(r->ch, RDMA_CM_EVENT_ESTABLISHED, deadline, &ev, "connect to", desc,
		      timeout_ms, err);
	if (ret)
		return ret;
	r->connected = true;
	ret = take_hello(r, ev->param.conn.private_data, ev->param.conn.private_data_len,
			 "connect to", err);
	rdma_ack_cm_event(ev);
	return ret;
}

int vmig__rdma_connect(const struct vmig_uri *u, const char *desc, int timeout_ms,
		       struct vmig_transport **out, struct vmig_err *err)
{
	struct addrinfo hints = {
		.ai_family = AF_UNSPEC,
		.ai_socktype = SOCK_STREAM,
		.ai_flags = AI_NUMERICSERV,
	};
	struct addrinfo *res;
	struct rdma_transport *r;
	int64_t deadline = deadline_after(timeout_ms);
	char port[8];
	int ret, gai;

	*out = NULL;
	ret = check_device("connect to", desc, err);
	if (ret)
		return ret;
	snprintf(port, sizeof(port), "%u", u->port);
	gai = getaddrinfo(u->host, port, &hints, &res);
	if (gai != 0) {
		ret = gai == EAI_SYSTEM ? -errno : -EHOSTUNREACH;
		vmig_err_set(err, ret, "cannot resolve '%s' in %s: %s", u->host, desc,
			     gai == EAI_SYSTEM ? strerror(-ret) : gai_strerror(gai));
		return ret;
	}
	/*
	 * The first address only: RDMA CM resolves it to a device and a
	 * port, and a name with several addresses rarely has them on
	 * different fabrics.
	 */
	r = rdma_new(desc);
	if (!r) {
		freeaddrinfo(res);
		vmig_err_set(err, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	r->ch = rdma_create_event_channel();
	if (!r->ch || set_nonblock(r->ch->fd) < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot connect to %s: cannot open the RDMA connection "
			     "manager: %s (is the rdma_ucm module loaded?)", desc, strerror(-ret));
		goto fail;
	}
	ret = connect_addr(r, res, deadline, timeout_ms, err);
	if (ret)
		goto fail;
	freeaddrinfo(res);
	*out = &r->base;
	return 0;
fail:
	freeaddrinfo(res);
	rdma_close(&r->base);
	return ret;
}

int vmig__rdma_listen(const struct vmig_uri *u, const char *desc,
		      struct vmig__rdma_listener **out, int *fd, char *uri,
		      size_t uri_len, struct vmig_err *err)
{
	struct addrinfo hints = {
		.ai_family = AF_UNSPEC,
		.ai_socktype = SOCK_STREAM,
		.ai_flags = AI_NUMERICSERV | AI_PASSIVE,
	};
	struct vmig__rdma_listener *l;
	struct addrinfo *res;
	char port[8];
	int ret, gai;

	*out = NULL;
	ret = check_device("listen on", desc, err);
	if (ret)
		return ret;
	snprintf(port, sizeof(port), "%u", u->port);
	gai = getaddrinfo(u->host, port, &hints, &res);
	if (gai != 0) {
		ret = gai == EAI_SYSTEM ? -errno : -EADDRNOTAVAIL;
		vmig_err_set(err, ret, "cannot resolve '%s' in %s: %s", u->host, desc,
			     gai == EAI_SYSTEM ? strerror(-ret) : gai_strerror(gai));
		return ret;
	}
	l = calloc(1, sizeof(*l));
	if (!l) {
		freeaddrinfo(res);
		vmig_err_set(err, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	l->ch = rdma_create_event_channel();
	if (!l->ch || set_nonblock(l->ch->fd) < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot listen on %s: cannot open the RDMA connection "
			     "manager: %s (is the rdma_ucm module loaded?)", desc, strerror(-ret));
		goto fail;
	}
	if (rdma_create_id(l->ch, &l->id, NULL, RDMA_PS_TCP)) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot listen on %s: rdma_create_id: %s", desc,
			     strerror(-ret));
		goto fail;
	}
	if (rdma_bind_addr(l->id, res->ai_addr) || rdma_listen(l->id, 16)) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot listen on %s: %s%s", desc, strerror(-ret),
			     ret == -EADDRINUSE ? " (another process listens there)" :
			     ret == -EADDRNOTAVAIL || ret == -ENODEV ?
			     " (not the address of an RDMA interface of this host)" : "");
		goto fail;
	}
	if (strchr(u->host, ':'))
		snprintf(l->uri, sizeof(l->uri), "rdma://[%s]:%u", u->host,
			 ntohs(rdma_get_src_port(l->id)));
	else
		snprintf(l->uri, sizeof(l->uri), "rdma://%s:%u", u->host,
			 ntohs(rdma_get_src_port(l->id)));
	snprintf(uri, uri_len, "%s", l->uri);
	freeaddrinfo(res);
	*fd = l->ch->fd;
	*out = l;
	return 0;
fail:
	freeaddrinfo(res);
	vmig__rdma_listener_close(l);
	return ret;
}

int vmig__rdma_accept(struct vmig__rdma_listener *l, int timeout_ms,
		      struct vmig_transport **out, struct vmig_err *err)
{
	int64_t deadline = deadline_after(timeout_ms);
	struct rdma_cm_event *ev;
	struct rdma_transport *r;
	struct rdma_conn_param cp;
	struct rdma_hello h;
	char desc[4200], host[NI_MAXHOST];
	unsigned char hello[256];    /* private_data_len is a uint8_t */
	uint8_t hello_len;
	struct sockaddr *peer;
	int ret;

	*out = NULL;
	for (;;) {
		ret = cm_wait(l->ch, RDMA_CM_EVENT_CONNECT_REQUEST, deadline, &ev,
			      "accept a connection on", l->uri, timeout_ms, err);
		if (ret == -ETIMEDOUT) {
			vmig_err_clear(err);
			vmig_err_set(err, ret, "no connection on %s within %d ms", l->uri,
				     timeout_ms);
			return ret;
		}
		if (ret == 0)
			break;
		/* A late event of an abandoned request: wait for the next. */
		if (ret != -ECONNRESET && ret != -ECONNREFUSED && ret != -EHOSTUNREACH)
			return ret;
		vmig_err_clear(err);
	}
	peer = rdma_get_peer_addr(ev->id);
	if (peer && getnameinfo(peer, peer->sa_family == AF_INET6 ?
				sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in),
				host, sizeof(host), NULL, 0, NI_NUMERICHOST) == 0)
		snprintf(desc, sizeof(desc), peer->sa_family == AF_INET6 ? "rdma://[%s]:%u" :
			 "rdma://%s:%u", host, ntohs(rdma_get_dst_port(ev->id)));
	else
		snprintf(desc, sizeof(desc), "%.4000s (a peer)", l->uri);
	r = rdma_new(desc);
	if (!r) {
		struct rdma_cm_id *id = ev->id;

		rdma_reject(id, NULL, 0);
		rdma_ack_cm_event(ev);   /* before destroying: destroy waits for it */
		rdma_destroy_id(id);
		vmig_err_set(err, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	r->id = ev->id;
	hello_len = ev->param.conn.private_data_len;
	if (ev->param.conn.private_data && hello_len)
		memcpy(hello, ev->param.conn.private_data, hello_len);
	rdma_ack_cm_event(ev);
	/* Its later events (disconnect) go to a channel of its own. */
	r->ch = rdma_create_event_channel();
	if (!r->ch || set_nonblock(r->ch->fd) < 0 || rdma_migrate_id(r->id, r->ch)) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot accept %s: cannot open the RDMA connection "
			     "manager: %s", desc, strerror(-ret));
		goto reject;
	}
	ret = setup_qp(r, "accept", err);
	if (ret)
		goto reject;
	ret = take_hello(r, hello, hello_len, "accept", err);
	if (ret)
		goto reject;
	fill_hello(r, &h);
	conn_param(&cp, &h);
	if (rdma_accept(r->id, &cp)) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot accept %s: rdma_accept: %s", desc, strerror(-ret));
		goto fail;
	}
	ret = cm_wait(r->ch, RDMA_CM_EVENT_ESTABLISHED, deadline_after(
			timeout_ms < 0 || timeout_ms > RESOLVE_MS ? RESOLVE_MS : timeout_ms),
		      &ev, "accept", desc, RESOLVE_MS, err);
	if (ret)
		goto fail;
	rdma_ack_cm_event(ev);
	r->connected = true;
	*out = &r->base;
	return 0;
reject:
	rdma_reject(r->id, NULL, 0);
fail:
	rdma_close(&r->base);
	return ret;
}

void vmig__rdma_listener_close(struct vmig__rdma_listener *l)
{
	if (!l)
		return;
	if (l->id)
		rdma_destroy_id(l->id);
	if (l->ch)
		rdma_destroy_event_channel(l->ch);
	free(l);
}
