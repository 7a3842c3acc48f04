/*
 * vmig migration: the pre-copy engine (source), the receiver
 * (destination), and save/restore, all over one stream format
 * (man vmig-stream(5)).
 *
 * Source.  vmig_migrate_src_start() runs a migration of a VM in a thread
 * of its own; the VMM's main thread keeps serving the control socket,
 * reads progress with vmig_migrate_src_stats() whenever the eventfd of
 * vmig_migrate_src_event_fd() fires, may cancel, and joins the migration
 * with vmig_migrate_src_finish() once it has ended.
 *
 * Handoff: exactly one copy runs.  Before COMMIT is sent every failure
 * resumes the source VM; from COMMIT on the source never resumes on its
 * own: if RUNNING does not come back, the outcome is handoff-uncertain and
 * the VM stays paused for an admin to resolve.
 */
#ifndef VMIG_MIGRATE_H
#define VMIG_MIGRATE_H

#include <stdbool.h>
#include <stdint.h>

#include "vmig/stream.h"
#include "vmig/util.h"

struct vmig_vm;
struct vmig_transport;
struct vmig_migration;
struct vmig_prealloc;
struct json_object;

#define VMIG_MIGRATE_MAX_CHANNELS 8u

enum vmig_on_timeout {
	VMIG_ON_TIMEOUT_CANCEL,     /* give up, the VM keeps running here */
	VMIG_ON_TIMEOUT_FORCE,      /* switch over now, whatever the downtime */
};

struct vmig_ssh_options;

struct vmig_migrate_params {
	const char *uri;            /* tcp://HOST:PORT, unix:PATH, file:PATH,
	                               ssh://[USER@]HOST[:PORT] */
	const struct vmig_ssh_options *ssh;  /* ssh:// only (transport.h);
	                               NULL: the defaults; copied */
	uint32_t max_downtime_ms;   /* default 300 */
	uint32_t timeout_s;         /* 0 = none */
	enum vmig_on_timeout on_timeout;
	enum vmig_compress compress;  /* NONE, LZ4 or AUTO (stream.h) */
	/*
	 * Connections carrying pages, each with its own sending thread
	 * (tcp://, unix: and ssh://, where each is an SSH connection of its
	 * own); 0 or 1: the one connection.
	 */
	unsigned int channels;
	uint64_t bandwidth_bps;     /* pre-copy cap, bytes/s; 0 = none */
	/*
	 * Auto-converge: when the guest dirties memory faster than the link
	 * carries it, throttle its vCPUs in steps (initial, then +step, up to
	 * max %) until the migration converges.  0 max = never.
	 */
	unsigned int throttle_initial, throttle_step, throttle_max;
	bool resume_dst;            /* a paused VM arrives running */
	/*
	 * The stream version to send: 0 (the newest, 2) or 1, for a
	 * destination running vmig 0.1.0 from before LIVE_PAGES (raw pages
	 * are then copied before they are sent, as that version expects).
	 */
	unsigned int stream_version;
	bool stop_after;            /* save: stop the VM once the file is complete */
};

enum vmig_migrate_status {
	VMIG_MIGRATE_SETUP,
	VMIG_MIGRATE_ACTIVE,        /* pre-copy iterations */
	VMIG_MIGRATE_SWITCHOVER,    /* VM paused, final pages and state */
	VMIG_MIGRATE_COMPLETED,     /* the destination runs the VM */
	VMIG_MIGRATE_CANCELLED,     /* the source runs the VM */
	VMIG_MIGRATE_FAILED,        /* the source runs the VM */
	VMIG_MIGRATE_UNCERTAIN,     /* COMMIT sent, no RUNNING: VM paused here */
};

struct vmig_migrate_stats {
	enum vmig_migrate_status status;
	uint64_t iteration;
	uint64_t total_ms;
	uint64_t downtime_ms;          /* pause to RUNNING (or to end of file) */
	uint64_t transferred_bytes;    /* on the wire */
	uint64_t ram_total_bytes;
	uint64_t remaining_bytes;      /* dirty pages left x bytes per page */
	uint64_t dirty_pages;          /* dirty at the last sync */
	uint64_t dirty_rate_pps;       /* pages dirtied per second */
	uint64_t bandwidth_bps;        /* bytes per second, last iteration */
	uint64_t expected_downtime_ms;
	uint64_t eta_ms;
	uint64_t pages_zero, pages_raw, pages_lz4;
	uint64_t state_bytes;
	unsigned int throttle_pct;     /* vCPU throttle now (auto-converge) */
	uint64_t bandwidth_limit_bps;  /* the cap in force, 0 = none */
	unsigned int channels;         /* connections carrying pages */
	unsigned int stream_version;   /* of the forward stream (vmig-stream(5)) */
	char error[512];
};

const char *vmig_migrate_status_name(enum vmig_migrate_status s);
bool vmig_migrate_status_final(enum vmig_migrate_status s);

/* Start migrating @vm (running or paused).  Owner thread. */
int vmig_migrate_src_start(struct vmig_vm *vm, const struct vmig_migrate_params *p,
			   struct vmig_migration **out, struct vmig_err *err);
/* Readable whenever the stats changed; a final status means it has ended. */
int vmig_migrate_src_event_fd(const struct vmig_migration *m);
void vmig_migrate_src_stats(struct vmig_migration *m, struct vmig_migrate_stats *out);
/* Change the pre-copy bandwidth cap (0 = none).  Any thread. */
void vmig_migrate_src_set_bandwidth(struct vmig_migration *m, uint64_t bps);
/* Ask to cancel; effective only before COMMIT.  Any thread. */
void vmig_migrate_src_cancel(struct vmig_migration *m);
/* Join the ended migration thread and free it; returns its final status. */
enum vmig_migrate_status vmig_migrate_src_finish(struct vmig_migration *m,
						 struct vmig_migrate_stats *final);

/* Stats as the control protocol's JSON event ("progress" or "result"). */
struct json_object *vmig_migrate_stats_json(const struct vmig_migrate_stats *s);

/*
 * Destination: read a stream from @t, build the VM it describes, load it
 * and, for a live migration, take part in the handoff.  Returns 0 with the
 * new VM in *out (running or paused, as the stream asked), or -errno with
 * the reason in @err and nothing left behind.  @name overrides the name in
 * the stream.  Blocking; owner thread of the new VM.
 */
struct vmig_dst_params {
	const char *name;           /* overrides the stream's VM name, or NULL */
	bool live;                  /* the transport carries replies: a live
	                               stream gets its handoff (a saved one,
	                               e.g. piped in, is restored as is) */
	int console_fd;
	bool paused;                /* restore: keep it paused */
	bool resume;                /* restore: run it even if it was paused */
	/*
	 * Called once the stream's configuration is known and checked, with
	 * the VM's final name, before anything is built: take the name (lock
	 * files, sockets).  Non-zero refuses the VM with @err's message.
	 */
	int (*claim)(void *arg, const char *name, struct vmig_err *err);
	void *claim_arg;
	/*
	 * Where the source's extra channels connect (the listener the first
	 * connection came from), or NULL: then a source asking for more than
	 * one channel is refused.  Borrowed.
	 */
	struct vmig_listener *listener;
	/*
	 * Without a listener (incoming --stdio, started over SSH): called for
	 * each extra channel of migration @session, returns its transport
	 * within @timeout_ms or -errno with the reason in @err.  Optional.
	 */
	int (*accept_channel)(void *arg, uint64_t session, int timeout_ms,
			      struct vmig_transport **out, struct vmig_err *err);
	void *accept_arg;
	/* Guest RAM allocated beforehand (vmm: vmig_prealloc_create), or NULL. */
	struct vmig_prealloc *prealloc;
	/*
	 * Optional, called before each record and before READY: non-zero
	 * (with @err set) abandons the migration before the handoff, e.g. on
	 * a signal; the source is told and keeps the VM.
	 */
	int (*check_abort)(void *arg, struct vmig_err *err);
	void *check_arg;
	/* Progress, optional: called after every ITER_END. */
	void (*progress)(void *arg, uint64_t iteration, uint64_t bytes);
	void *progress_arg;
	/* Optional: what arrived, summed over the channels (set at the end). */
	struct vmig_stream_stats *stats_out;
};
int vmig_migrate_dst_run(struct vmig_transport *t, const struct vmig_dst_params *p,
			 struct vmig_vm **out, struct vmig_err *err);

#endif
