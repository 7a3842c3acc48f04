/*
 * vmig evacuate: empty this host before maintenance.  Every VM (or the
 * ones named) moves, live, over SSH to one of the target hosts, a few at
 * a time, and a report says what happened to each.
 *
 * Phases:
 *  1. Drain mark (not with --dry-run): from here on `vmig run` and
 *     incoming migrations are refused on this host (cmd-host-info.c), so
 *     nothing lands while it is being emptied.  It stays after the
 *     evacuation, until `vmig host-info --undrain`; a refused plan takes
 *     back a mark it set itself.
 *  2. Plan (evacuate-plan.c): ask each target for `vmig host-info --json`
 *     over SSH, place every VM; a plan that does not fit is refused here,
 *     before anything moves.  --dry-run stops after printing it.
 *  3. Run: at most --parallel migrations at once, in --order.  Each one
 *     is driven, like `vmig migrate`, over the VM's control socket: this
 *     process sends "migrate" and follows the progress and result events
 *     the VMM streams back, all connections in one poll() loop (no child
 *     processes, so progress is structured and a cancel is one request).
 *     A failure moves on to the next VM.  SIGINT/SIGTERM/SIGHUP: start no
 *     more, send "cancel" to each running one (before the handoff commits
 *     the VM keeps running here; after it, the migration completes) and
 *     wait for their results.
 *  4. Summary table, --report file, --json; exit 0 only if every VM moved.
 *
 * --bandwidth TOTAL is split evenly over the migrations that may run at
 * once (TOTAL / min(--parallel, VMs)), so that together they never exceed
 * it; each share goes in its migrate request as "bandwidth_bps", the
 * pre-copy cap the VMM's migration engine enforces.
 *
 * Threads: one (the planner's SSH queries run in threads of their own and
 * are joined before phase 3).  Signals are blocked and read from a
 * signalfd from the start, so a Ctrl-C during planning ends it cleanly
 * too.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "vmig/transport.h"
#include "vmig/util.h"
#include "cli.h"
#include "evacuate.h"

#define JSON_FLAGS (JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE)
#define QUERY_TIMEOUT_MS   20000   /* each target's host-info */
#define GONE_TIMEOUT_MS    30000   /* a migrated VM's source VMM exits */
#define PROGRESS_EVERY_MS  2000    /* progress lines when not on a terminal */
#define GIB                (1ull << 30)

struct evac_opts {
	const char *to;
	bool all;
	char **names;
	int nr_names;
	char *exclude[256];
	int nr_exclude;
	unsigned int parallel;
	const char *order;
	uint64_t bandwidth;
	uint32_t max_downtime;
	uint32_t timeout_per_gib;
	const char *on_timeout;
	uint32_t stream_version;   /* 0: the default (2) */
	bool dry_run;
	const char *report;
	bool json;
	const char *reason;
	/* SSH, as for vmig migrate */
	const char *remote_vmig;
	const char *known_hosts;   /* absolute */
	const char *identity;      /* absolute */
	bool accept_new;
	char known_hosts_abs[PATH_MAX + 1];
	char identity_abs[PATH_MAX + 1];
};

enum phase {
	PH_WAITING,      /* not started yet */
	PH_STARTING,     /* request sent, no reply yet */
	PH_RUNNING,      /* following its events */
	PH_FINISHING,    /* completed: waiting for the source VMM to exit */
	PH_DONE,
};

struct run_vm {
	struct evac_vm *vm;
	const struct evac_target *target;
	enum phase phase;
	int fd;
	struct vmig_ctl_reader rd;
	bool cancel_sent;
	struct json_object *progress;   /* the last progress event */
	struct json_object *result;     /* the result event */
	char outcome[32];               /* completed, failed, cancelled, ... */
	char error[1024];
	int64_t start_wall_ms, end_wall_ms;
	uint64_t start_ms, end_ms, finishing_since_ms;
};

struct run {
	const struct evac_opts *o;
	struct evac_plan *plan;
	struct run_vm *vms;
	unsigned int nr;
	int sig_fd;
	bool stopping;
	unsigned int signals;
	bool tty;
	unsigned int drawn;             /* progress lines on screen (tty) */
	uint64_t last_draw_ms;
	uint64_t bw_share;
	uint64_t start_ms;
	int64_t start_wall_ms, end_wall_ms;
};

static uint64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static int64_t wall_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void iso_time(int64_t ms, char *buf, size_t len)
{
	time_t s = (time_t)(ms / 1000);
	struct tm tm;
	char base[32];

	gmtime_r(&s, &tm);
	strftime(base, sizeof(base), "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(buf, len, "%s.%03dZ", base, (int)(ms % 1000));
}

/* ------------------------------------------------------------------------
 * Options
 */

static int parse_u32(const char *opt, const char *s, uint32_t *out)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || *end || !*s || *s == '-' || v > UINT32_MAX)
		return cli_usage_error("evacuate", "bad %s '%s': give a whole number", opt, s);
	*out = (uint32_t)v;
	return 0;
}

/* A bandwidth: a size per second ("100M", "1G"; "/s" and "ps" allowed). */
static int parse_bandwidth(const char *s, uint64_t *out)
{
	char buf[64];
	size_t n = strlen(s);

	if (n >= sizeof(buf))
		return -EINVAL;
	memcpy(buf, s, n + 1);
	if (n > 2 && (!strcmp(buf + n - 2, "/s") || !strcmp(buf + n - 2, "ps")))
		buf[n - 2] = '\0';
	return vmig_size_parse(buf, out) < 0 || *out == 0 ? -EINVAL : 0;
}

static void usage(void)
{
	printf("Usage: vmig evacuate --to HOST[,HOST...] (NAME... | --all) [--exclude NAME]...\n"
	       "                     [--parallel N] [--order small-first|large-first|NAME,...]\n"
	       "                     [--bandwidth TOTAL] [--max-downtime MS]\n"
	       "                     [--timeout-per-gib S [--on-timeout cancel|force]]\n"
	       "                     [--stream-version 1|2]\n"
	       "                     [--dry-run] [--report FILE] [--json] [--reason TEXT]\n"
	       "                     [--remote-vmig CMD] [--known-hosts FILE]\n"
	       "                     [--accept-new-host-key] [--identity FILE]\n\n"
	       "Live-migrate the VMs of this host to the target hosts through SSH, a few\n"
	       "at a time, and report what happened to each.  The targets are asked\n"
	       "for their free memory and CPU features first ('vmig host-info'); a plan\n"
	       "that does not fit is refused before anything moves.  This host is\n"
	       "drained: 'vmig run' and incoming migrations are refused here until\n"
	       "'vmig host-info --undrain'.  Ctrl-C cancels the running migrations\n"
	       "(their VMs keep running here) and starts no more.\n\n"
	       "  -t, --to HOSTS         targets: [ssh://][USER@]HOST[:PORT], comma-separated\n"
	       "  -a, --all              every VM of this host\n"
	       "  -x, --exclude NAME     leave NAME here (repeat, or NAME,NAME)\n"
	       "  -p, --parallel N       migrations at once (default 1)\n"
	       "  -o, --order ORDER      small-first (default), large-first, or VM names\n"
	       "                         (those first, in that order; the rest small-first)\n"
	       "  -b, --bandwidth TOTAL  bytes per second for all migrations together\n"
	       "                         (e.g. 500M), split between those running at once\n"
	       "  -D, --max-downtime MS  each VM's pause limit (default 300)\n"
	       "      --timeout-per-gib S  give up (or force) a migration not converged\n"
	       "                         after S seconds per GiB of its VM's memory\n"
	       "      --on-timeout WHAT  cancel (default) or force\n"
	       "      --stream-version 1 for targets still running vmig 0.1.0 (default 2)\n"
	       "  -n, --dry-run          print the plan, change nothing\n"
	       "  -r, --report FILE      write a JSON report: every VM's result, target,\n"
	       "                         times, downtime, bytes and error\n"
	       "  -j, --json             print the report (or the plan) as JSON on stdout\n"
	       "      --reason TEXT      recorded in the drain mark\n"
	       "SSH, as for vmig migrate:\n"
	       "      --remote-vmig CMD  run CMD instead of 'vmig' on the targets\n"
	       "      --known-hosts FILE check the targets' keys in FILE\n"
	       "      --accept-new-host-key  record keys of hosts not known yet\n"
	       "  -i, --identity FILE    log in with this private key\n");
}

enum {
	OPT_TIMEOUT_PER_GIB = 256,
	OPT_ON_TIMEOUT,
	OPT_REMOTE_VMIG,
	OPT_KNOWN_HOSTS,
	OPT_ACCEPT_NEW,
	OPT_REASON,
	OPT_STREAM_VERSION,
};

static int parse_opts(int argc, char **argv, struct evac_opts *o)
{
	static const struct option longopts[] = {
		{ "to",              required_argument, NULL, 't' },
		{ "all",             no_argument,       NULL, 'a' },
		{ "exclude",         required_argument, NULL, 'x' },
		{ "parallel",        required_argument, NULL, 'p' },
		{ "order",           required_argument, NULL, 'o' },
		{ "bandwidth",       required_argument, NULL, 'b' },
		{ "max-downtime",    required_argument, NULL, 'D' },
		{ "timeout-per-gib", required_argument, NULL, OPT_TIMEOUT_PER_GIB },
		{ "on-timeout",      required_argument, NULL, OPT_ON_TIMEOUT },
		{ "dry-run",         no_argument,       NULL, 'n' },
		{ "report",          required_argument, NULL, 'r' },
		{ "json",            no_argument,       NULL, 'j' },
		{ "reason",          required_argument, NULL, OPT_REASON },
		{ "stream-version",  required_argument, NULL, OPT_STREAM_VERSION },
		{ "remote-vmig",     required_argument, NULL, OPT_REMOTE_VMIG },
		{ "known-hosts",     required_argument, NULL, OPT_KNOWN_HOSTS },
		{ "accept-new-host-key", no_argument,   NULL, OPT_ACCEPT_NEW },
		{ "identity",        required_argument, NULL, 'i' },
		{ "help",            no_argument,       NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	uint32_t v;
	int c, ret;

	memset(o, 0, sizeof(*o));
	o->parallel = 1;
	o->max_downtime = 300;
	o->order = "small-first";
	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":t:ax:p:o:b:D:nr:ji:h", longopts, NULL)) != -1) {
		switch (c) {
		case 't':
			o->to = optarg;
			break;
		case 'a':
			o->all = true;
			break;
		case 'x': {
			char *tok, *save = NULL;

			for (tok = strtok_r(optarg, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
				if (o->nr_exclude == (int)(sizeof(o->exclude) / sizeof(o->exclude[0])))
					return cli_usage_error("evacuate", "too many --exclude");
				o->exclude[o->nr_exclude++] = tok;
			}
			break;
		}
		case 'p':
			ret = parse_u32("--parallel", optarg, &v);
			if (ret)
				return ret;
			if (v < 1)
				return cli_usage_error("evacuate", "--parallel must be at least 1");
			o->parallel = v;
			break;
		case 'o':
			o->order = optarg;
			break;
		case 'b':
			if (parse_bandwidth(optarg, &o->bandwidth) < 0)
				return cli_usage_error("evacuate", "bad --bandwidth '%s': give bytes "
						       "per second, such as 500M or 1G", optarg);
			break;
		case 'D':
			ret = parse_u32("--max-downtime", optarg, &o->max_downtime);
			if (ret)
				return ret;
			if (!o->max_downtime)
				return cli_usage_error("evacuate", "--max-downtime must be at least 1 ms");
			break;
		case OPT_STREAM_VERSION:
			ret = parse_u32("--stream-version", optarg, &o->stream_version);
			if (ret)
				return ret;
			if (o->stream_version < 1 || o->stream_version > 2)
				return cli_usage_error("evacuate", "--stream-version must be 1 or 2");
			break;
		case OPT_TIMEOUT_PER_GIB:
			ret = parse_u32("--timeout-per-gib", optarg, &o->timeout_per_gib);
			if (ret)
				return ret;
			if (!o->timeout_per_gib)
				return cli_usage_error("evacuate", "--timeout-per-gib must be at least 1");
			break;
		case OPT_ON_TIMEOUT:
			if (strcmp(optarg, "cancel") && strcmp(optarg, "force"))
				return cli_usage_error("evacuate", "bad --on-timeout '%s': use cancel "
						       "or force", optarg);
			o->on_timeout = optarg;
			break;
		case 'n':
			o->dry_run = true;
			break;
		case 'r':
			o->report = optarg;
			break;
		case 'j':
			o->json = true;
			break;
		case OPT_REASON:
			o->reason = optarg;
			break;
		case OPT_REMOTE_VMIG:
			if (!*optarg)
				return cli_usage_error("evacuate", "--remote-vmig needs a command");
			o->remote_vmig = optarg;
			break;
		case OPT_KNOWN_HOSTS:
			o->known_hosts = optarg;
			break;
		case OPT_ACCEPT_NEW:
			o->accept_new = true;
			break;
		case 'i':
			o->identity = optarg;
			break;
		case 'h':
			usage();
			exit(VMIG_EXIT_OK);
		case ':':
			return cli_usage_error("evacuate", "option '%s' needs a value", argv[optind - 1]);
		default:
			return cli_usage_error("evacuate", "unknown option '%s'", argv[optind - 1]);
		}
	}
	o->names = argv + optind;
	o->nr_names = argc - optind;
	if (!o->to)
		return cli_usage_error("evacuate", "say where the VMs go: --to HOST[,HOST...]");
	if (o->all == (o->nr_names > 0))
		return cli_usage_error("evacuate", o->all ? "give either VM names or --all, not both" :
				       "name the VMs to move, or give --all");
	if (o->on_timeout && !o->timeout_per_gib)
		return cli_usage_error("evacuate", "--on-timeout needs --timeout-per-gib");
	for (c = 0; c < o->nr_names; c++)
		if (vmig_vm_name_valid(o->names[c]) < 0)
			return cli_usage_error("evacuate", "bad VM name '%s'", o->names[c]);
	if (o->known_hosts) {
		if (o->known_hosts[0] == '/') {
			snprintf(o->known_hosts_abs, sizeof(o->known_hosts_abs), "%s", o->known_hosts);
		} else {
			char cwd[PATH_MAX];

			if (!getcwd(cwd, sizeof(cwd)) ||
			    (size_t)snprintf(o->known_hosts_abs, sizeof(o->known_hosts_abs), "%s/%s",
					     cwd, o->known_hosts) >= sizeof(o->known_hosts_abs)) {
				cli_error("--known-hosts %s: cannot make the path absolute",
					  o->known_hosts);
				return VMIG_EXIT_ERROR;
			}
		}
		o->known_hosts = o->known_hosts_abs;
	}
	if (o->identity) {
		if (!realpath(o->identity, o->identity_abs) || access(o->identity_abs, R_OK) < 0) {
			cli_error("cannot read --identity %s: %s", o->identity, strerror(errno));
			return VMIG_EXIT_ERROR;
		}
		o->identity = o->identity_abs;
	}
	return 0;
}

static bool excluded(const struct evac_opts *o, const char *name)
{
	int i;

	for (i = 0; i < o->nr_exclude; i++)
		if (!strcmp(o->exclude[i], name))
			return true;
	return false;
}

/* ------------------------------------------------------------------------
 * Which VMs, in which order
 */

static int add_vm(struct evac_plan *plan, struct json_object *st)
{
	struct evac_vm *vm;

	vm = realloc(plan->vms, (plan->nr_vms + 1) * sizeof(*vm));
	if (!vm)
		return -ENOMEM;
	plan->vms = vm;
	vm = &plan->vms[plan->nr_vms++];
	memset(vm, 0, sizeof(*vm));
	snprintf(vm->name, sizeof(vm->name), "%s", jstr(st, "name", "?"));
	snprintf(vm->state, sizeof(vm->state), "%s", jstr(st, "state", "?"));
	vm->memory = ju64(st, "memory");
	vm->vcpus = (unsigned int)ju64(st, "vcpus");
	vm->target = -1;
	return 0;
}

static struct json_object *find_status(struct json_object *local, const char *name)
{
	size_t i, n = json_object_array_length(local);

	for (i = 0; i < n; i++)
		if (!strcmp(jstr(json_object_array_get_idx(local, i), "name", ""), name))
			return json_object_array_get_idx(local, i);
	return NULL;
}

/* The VMs to move (plan->vms), from this host's running VMs. */
static int select_vms(const struct evac_opts *o, struct evac_plan *plan)
{
	struct json_object *local = NULL;
	size_t i, n;
	int k;

	if (evac_local_vms(&local) < 0)
		return VMIG_EXIT_ERROR;
	if (o->all) {
		n = json_object_array_length(local);
		for (i = 0; i < n; i++) {
			struct json_object *st = json_object_array_get_idx(local, i);

			if (excluded(o, jstr(st, "name", "")))
				continue;
			if (add_vm(plan, st) < 0)
				goto oom;
		}
	} else {
		for (k = 0; k < o->nr_names; k++) {
			struct json_object *st = find_status(local, o->names[k]);
			unsigned int j;

			if (excluded(o, o->names[k]))
				continue;
			for (j = 0; j < plan->nr_vms; j++)
				if (!strcmp(plan->vms[j].name, o->names[k]))
					break;
			if (j < plan->nr_vms)
				continue;   /* named twice */
			if (!st) {
				cli_error("no VM named '%s' runs on this host", o->names[k]);
				json_object_put(local);
				return VMIG_EXIT_ERROR;
			}
			if (add_vm(plan, st) < 0)
				goto oom;
		}
	}
	json_object_put(local);
	return 0;
oom:
	json_object_put(local);
	cli_error("out of memory");
	return VMIG_EXIT_ERROR;
}

static int cmp_small_first(const void *a, const void *b)
{
	const struct evac_vm *x = a, *y = b;

	if (x->order != y->order)
		return x->order < y->order ? -1 : 1;
	if (x->memory != y->memory)
		return x->memory < y->memory ? -1 : 1;
	return strcmp(x->name, y->name);
}

static int cmp_large_first(const void *a, const void *b)
{
	const struct evac_vm *x = a, *y = b;

	if (x->memory != y->memory)
		return x->memory > y->memory ? -1 : 1;
	return strcmp(x->name, y->name);
}

/* Sort plan->vms into run order; an unknown name in a list is an error. */
static int order_vms(const struct evac_opts *o, struct evac_plan *plan)
{
	unsigned int i;

	if (!strcmp(o->order, "large-first")) {
		qsort(plan->vms, plan->nr_vms, sizeof(*plan->vms), cmp_large_first);
		return 0;
	}
	for (i = 0; i < plan->nr_vms; i++)
		plan->vms[i].order = UINT_MAX;
	if (strcmp(o->order, "small-first")) {
		char *copy = strdup(o->order), *tok, *save = NULL;
		unsigned int pos = 0;

		if (!copy)
			return VMIG_EXIT_ERROR;
		for (tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
			for (i = 0; i < plan->nr_vms; i++)
				if (!strcmp(plan->vms[i].name, tok))
					break;
			if (i == plan->nr_vms) {
				cli_usage_error("evacuate", "--order names '%s', which is not among "
						"the VMs to move (use small-first, large-first or "
						"their names)", tok);
				free(copy);
				return VMIG_EXIT_USAGE;
			}
			if (plan->vms[i].order == UINT_MAX)
				plan->vms[i].order = pos++;
		}
		free(copy);
	}
	qsort(plan->vms, plan->nr_vms, sizeof(*plan->vms), cmp_small_first);
	return 0;
}

/* ------------------------------------------------------------------------
 * Running the migrations
 */

static void add_ssh_request(const struct evac_opts *o, struct json_object *req)
{
	struct json_object *s = json_object_new_object();
	const char *agent = getenv("SSH_AUTH_SOCK");

	if (o->remote_vmig)
		json_object_object_add(s, "remote_vmig", json_object_new_string(o->remote_vmig));
	if (o->known_hosts)
		json_object_object_add(s, "known_hosts", json_object_new_string(o->known_hosts));
	if (o->identity)
		json_object_object_add(s, "identity", json_object_new_string(o->identity));
	json_object_object_add(s, "agent_socket", json_object_new_string(agent ? agent : ""));
	json_object_object_add(s, "accept_new_host_key", json_object_new_boolean(o->accept_new));
	json_object_object_add(req, "ssh", s);
}

/* Clear the progress block drawn on the terminal. */
static void undraw(struct run *r)
{
	if (!r->tty || !r->drawn)
		return;
	fprintf(stderr, "\033[%uA\033[J", r->drawn);
	r->drawn = 0;
}

static void event_line(struct run *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void event_line(struct run *r, const char *fmt, ...)
{
	va_list ap;

	undraw(r);
	fputs("vmig: evacuate: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	if (r->tty)
		r->last_draw_ms = 0;   /* redraw the block under it soon */
}

static void finish(struct run *r, struct run_vm *v, const char *outcome, const char *error)
{
	if (v->fd >= 0) {
		vmig_ctl_reader_fini(&v->rd);
		close(v->fd);
		v->fd = -1;
	}
	v->phase = PH_DONE;
	if (!v->end_ms) {
		v->end_ms = mono_ms();
		v->end_wall_ms = wall_ms();
	}
	snprintf(v->outcome, sizeof(v->outcome), "%s", outcome);
	if (error && !v->error[0])
		snprintf(v->error, sizeof(v->error), "%s", error);
	if (!strcmp(outcome, "completed") || !strcmp(outcome, "not-started")) {
		/* said when its result came / once for all of them */
	} else if (!strcmp(outcome, "handoff-uncertain")) {
		event_line(r, "%s -> %s: handoff uncertain: %s; the VM is paused here and may "
			   "run there: check with 'vmig status %s' on %s", v->vm->name,
			   v->target->label, v->error, v->vm->name, v->target->label);
	} else {
		event_line(r, "%s -> %s: %s%s%s; it keeps running here", v->vm->name,
			   v->target->label, outcome, v->error[0] ? ": " : "", v->error);
	}
}

static void start_one(struct run *r, struct run_vm *v)
{
	const struct evac_opts *o = r->o;
	struct json_object *req;
	char path[4096], mem[32];
	uint32_t timeout_s = 0;
	int ret;

	v->start_ms = mono_ms();
	v->start_wall_ms = wall_ms();
	vmig_size_format(v->vm->memory, mem, sizeof(mem));
	event_line(r, "%s (%s) -> %s: starting", v->vm->name, mem, v->target->label);
	if (cli_vm_path(v->vm->name, "sock", path, sizeof(path)) < 0) {
		finish(r, v, "failed", "bad VM name");
		return;
	}
	ret = vmig_ctl_connect(path, &v->fd);
	if (ret < 0) {
		v->fd = -1;
		finish(r, v, "failed", ret == -ENOENT || ret == -ECONNREFUSED ?
		       "the VM no longer runs here" : strerror(-ret));
		return;
	}
	if (o->timeout_per_gib)
		timeout_s = (uint32_t)(((uint64_t)o->timeout_per_gib * v->vm->memory + GIB - 1) / GIB);
	req = vmig_ctl_request("migrate");
	json_object_object_add(req, "uri", json_object_new_string(v->target->uri));
	add_ssh_request(o, req);
	json_object_object_add(req, "max_downtime_ms", json_object_new_int64(o->max_downtime));
	json_object_object_add(req, "timeout_s", json_object_new_int64(timeout_s));
	json_object_object_add(req, "on_timeout", json_object_new_string(
		o->on_timeout ? o->on_timeout : "cancel"));
	json_object_object_add(req, "compress", json_object_new_boolean(1));
	if (r->bw_share)
		json_object_object_add(req, "bandwidth_bps", json_object_new_uint64(r->bw_share));
	if (o->stream_version)
		json_object_object_add(req, "stream_version",
				       json_object_new_int64(o->stream_version));
	ret = vmig_ctl_send(v->fd, req);
	json_object_put(req);
	if (ret < 0) {
		finish(r, v, "failed", "the VM's control socket closed");
		return;
	}
	/* The rest comes through poll(): never block on one VM. */
	fcntl(v->fd, F_SETFL, fcntl(v->fd, F_GETFL) | O_NONBLOCK);
	vmig_ctl_reader_init(&v->rd, v->fd);
	v->phase = PH_STARTING;
}

static void send_cancel(struct run *r, struct run_vm *v)
{
	struct json_object *reply = NULL;
	char path[4096];

	(void)r;
	if (v->cancel_sent)
		return;
	v->cancel_sent = true;
	if (cli_vm_path(v->vm->name, "sock", path, sizeof(path)) == 0)
		vmig_ctl_call(path, vmig_ctl_request("cancel"), &reply);
	json_object_put(reply);
}

/* Take in what VM @v's VMM sent. */
static void read_events(struct run *r, struct run_vm *v)
{
	for (;;) {
		struct json_object *msg = NULL;
		const char *ev, *err = NULL;
		int ret = vmig_ctl_recv(&v->rd, &msg);

		if (ret == -EAGAIN)
			return;
		if (ret == -EPROTO)
			continue;
		if (ret < 0) {
			char why[256];

			snprintf(why, sizeof(why), "lost the VM's control connection (%s): its VMM "
				 "may have exited", strerror(-ret));
			finish(r, v, "failed", why);
			return;
		}
		if (v->phase == PH_STARTING) {
			if (vmig_ctl_reply_status(msg, &err) < 0) {
				char why[1024];

				snprintf(why, sizeof(why), "%s", err ? err : "refused");
				json_object_put(msg);
				finish(r, v, "failed", why);
				return;
			}
			v->phase = PH_RUNNING;
			/* Interrupted while the request was on its way. */
			if (r->stopping)
				send_cancel(r, v);
			json_object_put(msg);
			continue;
		}
		ev = jstr(msg, "event", "");
		if (!strcmp(ev, "progress")) {
			json_object_put(v->progress);
			v->progress = msg;
			continue;
		}
		if (strcmp(ev, "result")) {
			json_object_put(msg);
			continue;
		}
		json_object_object_del(msg, "event");
		v->result = msg;
		v->end_ms = mono_ms();
		v->end_wall_ms = wall_ms();
		if (!strcmp(jstr(msg, "status", ""), "completed")) {
			char t[32], sent[32];

			vmig_duration_format(ju64(msg, "total_time_ms"), t, sizeof(t));
			vmig_size_format(ju64(msg, "transferred_bytes"), sent, sizeof(sent));
			event_line(r, "%s -> %s: completed in %s, downtime %" PRIu64 " ms, %s sent",
				   v->vm->name, v->target->label, t, ju64(msg, "downtime_ms"), sent);
			/* The source VMM lets go of the VM: wait until it is gone,
			 * so that the name is free here when we say it moved. */
			vmig_ctl_reader_fini(&v->rd);
			close(v->fd);
			v->fd = -1;
			v->phase = PH_FINISHING;
			v->finishing_since_ms = mono_ms();
			return;
		}
		finish(r, v, jstr(msg, "status", "failed"), jstr(msg, "error", NULL));
		return;
	}
}

/* Whether VM @name's VMM has let go of its pid file lock (it exited). */
static bool vmm_gone(const char *name)
{
	char path[4096];
	int fd;
	bool gone;

	if (cli_vm_path(name, "pid", path, sizeof(path)) < 0)
		return true;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return true;
	gone = flock(fd, LOCK_SH | LOCK_NB) == 0;
	close(fd);
	return gone;
}

static void progress_line(struct run_vm *v, char *buf, size_t len)
{
	char sent[32], rem[32], bw[32], eta[32];
	struct json_object *p = v->progress;

	if (!p) {
		snprintf(buf, len, "  %-16s -> %-22.60s setting up", v->vm->name, v->target->label);
		return;
	}
	vmig_size_format(ju64(p, "transferred_bytes"), sent, sizeof(sent));
	vmig_size_format(ju64(p, "remaining_bytes"), rem, sizeof(rem));
	vmig_size_format(ju64(p, "bandwidth_bps"), bw, sizeof(bw));
	vmig_duration_format(ju64(p, "eta_ms"), eta, sizeof(eta));
	snprintf(buf, len, "  %-16s -> %-22.60s iter %" PRIu64 "  sent %s  remaining %s  dirty %"
		 PRIu64 " pages/s  %s/s  eta %s%s", v->vm->name, v->target->label,
		 ju64(p, "iteration"), sent, rem, ju64(p, "dirty_rate_pps"), bw,
		 ju64(p, "eta_ms") ? eta : "-", v->cancel_sent ? "  (cancelling)" : "");
}

/*
 * One line of the progress block; on a terminal cut to its width, so
 * that no line wraps and the block can be moved over exactly.
 */
static void block_line(struct run *r, const char *line)
{
	struct winsize ws;
	int width = 0;

	if (r->tty && ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 1)
		width = ws.ws_col - 1;
	if (width)
		fprintf(stderr, "%.*s\n", width, line);
	else
		fprintf(stderr, "%s\n", line);
	r->drawn++;
}

static void draw(struct run *r, bool force)
{
	unsigned int i, moved = 0, failed = 0, running = 0, waiting = 0;
	uint64_t now = mono_ms(), sent = 0;
	char line[1024], s[32], t[32];

	if (r->o->json)
		return;
	if (!force && now - r->last_draw_ms < (r->tty ? 250 : PROGRESS_EVERY_MS))
		return;
	r->last_draw_ms = now;
	undraw(r);
	for (i = 0; i < r->nr; i++) {
		struct run_vm *v = &r->vms[i];

		switch (v->phase) {
		case PH_WAITING:
			waiting++;
			break;
		case PH_STARTING:
		case PH_RUNNING:
			running++;
			progress_line(v, line, sizeof(line));
			block_line(r, line);
			sent += ju64(v->progress, "transferred_bytes");
			break;
		case PH_FINISHING:
		case PH_DONE:
			if (!strcmp(v->outcome, "completed") || v->phase == PH_FINISHING)
				moved++;
			else if (strcmp(v->outcome, "not-started"))
				failed++;
			sent += ju64(v->result, "transferred_bytes");
			break;
		}
	}
	vmig_size_format(sent, s, sizeof(s));
	vmig_duration_format(now - r->start_ms, t, sizeof(t));
	snprintf(line, sizeof(line), "  total: %u of %u moved, %u failed, %u running, %u waiting; "
		 "%s sent; %s%s", moved, r->nr, failed, running, waiting, s, t,
		 r->stopping ? "; interrupted: cancelling" : "");
	block_line(r, line);
	if (!r->tty)
		r->drawn = 0;
}

static void on_signal(struct run *r)
{
	struct signalfd_siginfo si;
	unsigned int i, n = 0;

	while (read(r->sig_fd, &si, sizeof(si)) == sizeof(si)) {
		r->signals++;
		if (r->stopping) {
			for (i = 0; i < r->nr; i++)
				n += r->vms[i].phase == PH_STARTING || r->vms[i].phase == PH_RUNNING;
			event_line(r, "still waiting for %u migration%s to end (cancelled; a VM "
				   "whose handoff has begun completes it)", n, n == 1 ? "" : "s");
			continue;
		}
		r->stopping = true;
		event_line(r, "%s: cancelling the running migrations; no more will start",
			   strsignal((int)si.ssi_signo));
		for (i = 0; i < r->nr; i++) {
			struct run_vm *v = &r->vms[i];

			if (v->phase == PH_RUNNING)
				send_cancel(r, v);
			else if (v->phase == PH_WAITING)
				finish(r, v, "not-started", "the evacuation was interrupted first");
		}
	}
}

static void run_all(struct run *r)
{
	struct pollfd *pfd = calloc(r->nr + 1, sizeof(*pfd));
	unsigned int *who = calloc(r->nr + 1, sizeof(*who));
	unsigned int i, next = 0;

	if (!pfd || !who) {
		free(pfd);
		free(who);
		for (i = 0; i < r->nr; i++)
			finish(r, &r->vms[i], "not-started", "out of memory");
		return;
	}
	for (;;) {
		unsigned int running = 0, n = 1;

		for (i = 0; i < r->nr; i++)
			running += r->vms[i].phase == PH_STARTING || r->vms[i].phase == PH_RUNNING;
		while (!r->stopping && running < r->o->parallel && next < r->nr) {
			struct run_vm *v = &r->vms[next++];

			if (v->phase != PH_WAITING)
				continue;
			start_one(r, v);
			if (v->phase == PH_STARTING)
				running++;
		}
		while (next < r->nr && r->vms[next].phase != PH_WAITING)
			next++;
		for (i = 0; i < r->nr; i++) {
			struct run_vm *v = &r->vms[i];

			if (v->phase != PH_FINISHING)
				continue;
			if (vmm_gone(v->vm->name)) {
				finish(r, v, "completed", NULL);
			} else if (mono_ms() - v->finishing_since_ms > GONE_TIMEOUT_MS) {
				/* It moved; the old VMM is stuck: say so, but it moved. */
				finish(r, v, "completed", NULL);
				snprintf(v->error, sizeof(v->error), "the VMM here did not exit after "
					 "the migration (pid file %s.pid still locked)", v->vm->name);
				event_line(r, "%s: %s", v->vm->name, v->error);
			}
		}
		{
			bool active = false;

			for (i = 0; i < r->nr; i++)
				if (r->vms[i].phase != PH_DONE &&
				    (r->vms[i].phase != PH_WAITING || !r->stopping))
					active = true;
			if (!active)
				break;
		}
		pfd[0] = (struct pollfd){ .fd = r->sig_fd, .events = POLLIN };
		for (i = 0; i < r->nr; i++) {
			struct run_vm *v = &r->vms[i];

			if (v->phase != PH_STARTING && v->phase != PH_RUNNING)
				continue;
			pfd[n] = (struct pollfd){ .fd = v->fd, .events = POLLIN };
			who[n++] = i;
		}
		draw(r, false);
		if (poll(pfd, n, 200) < 0 && errno != EINTR)
			break;
		if (pfd[0].revents)
			on_signal(r);
		for (i = 1; i < n; i++)
			if (pfd[i].revents && r->vms[who[i]].phase != PH_DONE)
				read_events(r, &r->vms[who[i]]);
	}
	undraw(r);
	free(pfd);
	free(who);
}

/* ------------------------------------------------------------------------
 * Results
 */

static struct json_object *report_json(const struct run *r, const char *result,
				       const char *error)
{
	struct json_object *o = json_object_new_object(), *vms = json_object_new_array();
	unsigned int i, moved = 0, failed = 0, not_started = 0;
	char host[256] = "", when[48];

	gethostname(host, sizeof(host) - 1);
	for (i = 0; i < r->nr; i++) {
		const struct run_vm *v = &r->vms[i];
		struct json_object *e = json_object_new_object();

		json_object_object_add(e, "name", json_object_new_string(v->vm->name));
		json_object_object_add(e, "memory", json_object_new_uint64(v->vm->memory));
		json_object_object_add(e, "vcpus", json_object_new_int((int)v->vm->vcpus));
		json_object_object_add(e, "target", v->target ?
			json_object_new_string(v->target->uri) : NULL);
		json_object_object_add(e, "target_host", v->target ?
			json_object_new_string(v->target->label) : NULL);
		json_object_object_add(e, "result", json_object_new_string(
			v->outcome[0] ? v->outcome : "not-started"));
		if (v->start_wall_ms) {
			iso_time(v->start_wall_ms, when, sizeof(when));
			json_object_object_add(e, "started_at", json_object_new_string(when));
			json_object_object_add(e, "started_at_ms",
					       json_object_new_int64(v->start_wall_ms));
			iso_time(v->end_wall_ms, when, sizeof(when));
			json_object_object_add(e, "ended_at", json_object_new_string(when));
			json_object_object_add(e, "ended_at_ms", json_object_new_int64(v->end_wall_ms));
			json_object_object_add(e, "elapsed_ms",
					       json_object_new_uint64(v->end_ms - v->start_ms));
		}
		if (v->result) {
			json_object_object_add(e, "total_time_ms",
					       json_object_new_uint64(ju64(v->result, "total_time_ms")));
			json_object_object_add(e, "downtime_ms",
					       json_object_new_uint64(ju64(v->result, "downtime_ms")));
			json_object_object_add(e, "transferred_bytes", json_object_new_uint64(
				ju64(v->result, "transferred_bytes")));
			json_object_object_add(e, "iterations",
					       json_object_new_uint64(ju64(v->result, "iterations")));
			json_object_object_add(e, "stream_version",
					       json_object_new_uint64(ju64(v->result, "stream_version")));
		}
		json_object_object_add(e, "error", v->error[0] ?
				       json_object_new_string(v->error) : NULL);
		json_object_array_add(vms, e);
		if (!strcmp(v->outcome, "completed"))
			moved++;
		else if (!v->outcome[0] || !strcmp(v->outcome, "not-started"))
			not_started++;
		else
			failed++;
	}
	json_object_object_add(o, "host", json_object_new_string(host));
	json_object_object_add(o, "result", json_object_new_string(result));
	if (error)
		json_object_object_add(o, "error", json_object_new_string(error));
	if (r->start_wall_ms) {
		iso_time(r->start_wall_ms, when, sizeof(when));
		json_object_object_add(o, "started_at", json_object_new_string(when));
		iso_time(r->end_wall_ms, when, sizeof(when));
		json_object_object_add(o, "ended_at", json_object_new_string(when));
		json_object_object_add(o, "total_time_ms",
				       json_object_new_int64(r->end_wall_ms - r->start_wall_ms));
	}
	json_object_object_add(o, "parallel", json_object_new_int((int)r->o->parallel));
	json_object_object_add(o, "bandwidth_bps", json_object_new_uint64(r->o->bandwidth));
	json_object_object_add(o, "bandwidth_per_migration_bps",
			       json_object_new_uint64(r->bw_share));
	json_object_object_add(o, "max_downtime_ms", json_object_new_int64(r->o->max_downtime));
	json_object_object_add(o, "dry_run", json_object_new_boolean(r->o->dry_run));
	json_object_object_add(o, "moved", json_object_new_int((int)moved));
	json_object_object_add(o, "failed", json_object_new_int((int)failed));
	json_object_object_add(o, "not_started", json_object_new_int((int)not_started));
	json_object_object_add(o, "vms", vms);
	json_object_object_add(o, "plan", evac_plan_json(r->plan));
	return o;
}

/* Write @o to @path, beside and renamed: a reader never sees half of it. */
static int write_report(const char *path, struct json_object *o)
{
	const char *text = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY |
							  JSON_C_TO_STRING_NOSLASHESCAPE);
	char tmp[PATH_MAX + 32];
	FILE *f;

	snprintf(tmp, sizeof(tmp), "%s.%d.tmp", path, (int)getpid());
	f = fopen(tmp, "we");
	if (!f || fprintf(f, "%s\n", text) < 0 || fclose(f) != 0 || rename(tmp, path) < 0) {
		int ret = -errno;

		cli_error("cannot write the report %s: %s", path, strerror(-ret));
		unlink(tmp);
		return ret;
	}
	return 0;
}

static void print_summary(const struct run *r)
{
	unsigned int i, moved = 0, failed = 0, ns = 0;
	char mem[32], t[32], sent[32], total[32];

	printf("%-20s %10s  %-22s %-18s %9s %9s %10s\n", "VM", "MEMORY", "TARGET", "RESULT",
	       "TIME", "DOWNTIME", "SENT");
	for (i = 0; i < r->nr; i++) {
		const struct run_vm *v = &r->vms[i];
		char down[32] = "-";

		vmig_size_format(v->vm->memory, mem, sizeof(mem));
		if (v->start_ms)
			vmig_duration_format(v->end_ms - v->start_ms, t, sizeof(t));
		else
			snprintf(t, sizeof(t), "-");
		if (v->result) {
			vmig_size_format(ju64(v->result, "transferred_bytes"), sent, sizeof(sent));
			if (!strcmp(v->outcome, "completed"))
				snprintf(down, sizeof(down), "%" PRIu64 " ms",
					 ju64(v->result, "downtime_ms"));
		} else {
			snprintf(sent, sizeof(sent), "-");
		}
		printf("%-20s %10s  %-22s %-18s %9s %9s %10s\n", v->vm->name, mem,
		       v->target ? v->target->label : "-", v->outcome, t, down, sent);
		if (v->error[0])
			printf("    %s\n", v->error);
		if (!strcmp(v->outcome, "completed"))
			moved++;
		else if (!strcmp(v->outcome, "not-started"))
			ns++;
		else
			failed++;
	}
	vmig_duration_format((uint64_t)(r->end_wall_ms - r->start_wall_ms), total, sizeof(total));
	printf("%u of %u VM%s moved in %s", moved, r->nr, r->nr == 1 ? "" : "s", total);
	if (failed)
		printf("; %u failed", failed);
	if (ns)
		printf("; %u not started", ns);
	if (failed || ns) {
		const char *sep = " (still here: ";

		for (i = 0; i < r->nr; i++)
			if (strcmp(r->vms[i].outcome, "completed")) {
				printf("%s%s", sep, r->vms[i].vm->name);
				sep = ", ";
			}
		printf(")");
	}
	printf("\n");
}

/* ------------------------------------------------------------------------
 * The command
 */

/*
 * --all: the names of VMs that run here now but were not in the plan nor
 * excluded, as a new JSON array, or NULL if none.  A `vmig run` that had
 * checked the drain mark just before it was set can start its VM after
 * the VMs were listed; the host is then not empty, and the evacuation
 * says so instead of claiming it is.
 */
static struct json_object *late_vms(const struct evac_opts *o, const struct evac_plan *plan)
{
	struct json_object *local = NULL, *late = NULL;
	size_t i, n;
	unsigned int k;

	if (evac_local_vms(&local) < 0)
		return NULL;
	n = json_object_array_length(local);
	for (i = 0; i < n; i++) {
		const char *name = jstr(json_object_array_get_idx(local, i), "name", "");

		for (k = 0; k < plan->nr_vms; k++)
			if (!strcmp(plan->vms[k].name, name))
				break;
		if (k < plan->nr_vms || excluded(o, name))
			continue;
		if (!late)
			late = json_object_new_array();
		json_object_array_add(late, json_object_new_string(name));
	}
	json_object_put(local);
	return late;
}

static bool interrupted(int sig_fd)
{
	struct signalfd_siginfo si;

	return sig_fd >= 0 && read(sig_fd, &si, sizeof(si)) == sizeof(si);
}

int cmd_evacuate(int argc, char **argv)
{
	struct evac_opts o;
	struct evac_plan plan = { 0 };
	struct run r = { 0 };
	struct vmig_ssh_options ssh = { 0 };
	struct json_object *rep = NULL, *stragglers = NULL;
	char why[8192];
	bool drain_created = false, drained = false;
	unsigned int i, moved = 0;
	int ret, code = VMIG_EXIT_ERROR;

	ret = parse_opts(argc, argv, &o);
	if (ret)
		return ret;
	ret = evac_parse_targets(o.to, &plan);
	if (ret)
		return ret;
	r.o = &o;
	r.plan = &plan;
	r.tty = isatty(STDERR_FILENO) && !o.json;
	r.sig_fd = cli_block_signals();
	if (r.sig_fd < 0) {
		cli_error("cannot set up signal handling: %s", strerror(-r.sig_fd));
		goto out;
	}

	/* 1. Nothing new lands here from now on (a dry run changes nothing). */
	if (!o.dry_run) {
		char reason[512];

		snprintf(reason, sizeof(reason), "%s", o.reason ? o.reason : "");
		if (evac_drain_set("vmig evacuate", reason, &drain_created) < 0)
			goto out;
		drained = true;
	}

	/* 2. The plan. */
	ret = select_vms(&o, &plan);
	if (ret) {
		code = ret;
		goto refused;
	}
	ret = order_vms(&o, &plan);
	if (ret) {
		code = ret;
		goto refused;
	}
	plan.self = evac_host_info();
	if (!plan.self)
		goto refused;
	ssh.remote_vmig = o.remote_vmig;
	ssh.known_hosts = o.known_hosts;
	ssh.identity = o.identity;
	ssh.accept_new_host_key = o.accept_new;
	if (plan.nr_vms)
		evac_query_targets(&plan, &ssh, QUERY_TIMEOUT_MS);
	if (interrupted(r.sig_fd)) {
		cli_error("interrupted while planning: nothing was moved");
		goto refused;
	}
	r.nr = plan.nr_vms;
	r.vms = calloc(r.nr ? r.nr : 1, sizeof(*r.vms));
	if (!r.vms) {
		cli_error("out of memory");
		goto refused;
	}
	if (o.bandwidth)
		r.bw_share = o.bandwidth / (o.parallel < r.nr ? o.parallel : (r.nr ? r.nr : 1));
	ret = plan.nr_vms ? evac_place(&plan, why, sizeof(why)) : 0;
	for (i = 0; i < r.nr; i++) {
		r.vms[i].vm = &plan.vms[i];
		r.vms[i].fd = -1;
		r.vms[i].target = plan.vms[i].target >= 0 ? &plan.targets[plan.vms[i].target] : NULL;
		snprintf(r.vms[i].outcome, sizeof(r.vms[i].outcome), "not-started");
	}
	if (ret) {
		cli_error("%s", why);
		fprintf(stderr, "Nothing was moved.%s\n", drain_created ?
			"  (The drain mark set for this evacuation was removed.)" : "");
		if (o.report) {
			rep = report_json(&r, "refused", why);
			write_report(o.report, rep);
		}
		if (o.json) {
			if (!rep)
				rep = report_json(&r, "refused", why);
			printf("%s\n", json_object_to_json_string_ext(rep, JSON_FLAGS));
		}
		goto refused;
	}
	if (o.dry_run || !o.json) {
		char bw[32] = "unlimited", total[32];
		uint64_t sum = 0;

		for (i = 0; i < plan.nr_vms; i++)
			sum += plan.vms[i].memory;
		vmig_size_format(sum, total, sizeof(total));
		if (o.bandwidth) {
			vmig_size_format(o.bandwidth, bw, sizeof(bw));
			strcat(bw, "/s");
		}
		if (!o.json && !plan.nr_vms) {
			printf("No VM to move: none runs on this host%s.%s\n",
			       o.nr_exclude ? " but those excluded" : "",
			       o.dry_run ? " Dry run." : "");
		} else if (!o.json) {
			printf("Evacuation plan: %u VM%s (%s) to %u target%s, %u at a time, "
			       "bandwidth %s, max downtime %u ms%s\n", plan.nr_vms,
			       plan.nr_vms == 1 ? "" : "s", total, plan.nr_targets,
			       plan.nr_targets == 1 ? "" : "s", o.parallel, bw, o.max_downtime,
			       o.dry_run ? " (dry run)" : "");
			evac_plan_print(&plan, stdout);
			fflush(stdout);
		}
	}
	if (o.dry_run) {
		if (o.json) {
			rep = report_json(&r, "dry-run", NULL);
			printf("%s\n", json_object_to_json_string_ext(rep, JSON_FLAGS));
		} else if (plan.nr_vms) {
			printf("Dry run: nothing was changed.\n");
		}
		if (o.report) {
			if (!rep)
				rep = report_json(&r, "dry-run", NULL);
			write_report(o.report, rep);
		}
		code = VMIG_EXIT_OK;
		goto out;
	}

	/* 3. Move them. */
	for (i = 0; i < r.nr; i++)
		r.vms[i].outcome[0] = '\0';
	r.start_ms = mono_ms();
	r.start_wall_ms = wall_ms();
	run_all(&r);
	r.end_wall_ms = wall_ms();

	/* 4. Say what happened. */
	for (i = 0; i < r.nr; i++) {
		if (!r.vms[i].outcome[0])
			snprintf(r.vms[i].outcome, sizeof(r.vms[i].outcome), "not-started");
		moved += !strcmp(r.vms[i].outcome, "completed");
	}
	stragglers = o.all ? late_vms(&o, &plan) : NULL;
	rep = report_json(&r, moved == r.nr && !stragglers ? "completed" :
			  r.stopping ? "interrupted" : "incomplete", NULL);
	if (stragglers) {
		json_object_object_add(rep, "started_during", stragglers);
		fprintf(stderr, "vmig: evacuate: VMs started here while the host was being "
			"planned, not moved: %s\n", json_object_to_json_string_ext(stragglers,
									JSON_FLAGS));
	}
	if (o.report)
		write_report(o.report, rep);
	if (o.json)
		printf("%s\n", json_object_to_json_string_ext(rep, JSON_FLAGS));
	else if (r.nr)
		print_summary(&r);
	fprintf(stderr, "vmig: this host stays drained: 'vmig host-info --undrain' lets VMs "
		"start or arrive here again\n");
	code = moved == r.nr && !stragglers ? VMIG_EXIT_OK : VMIG_EXIT_ERROR;
	goto out;

refused:
	if (drained && drain_created)
		evac_drain_clear();
out:
	json_object_put(rep);
	if (r.vms) {
		for (i = 0; i < r.nr; i++) {
			if (r.vms[i].fd >= 0) {
				vmig_ctl_reader_fini(&r.vms[i].rd);
				close(r.vms[i].fd);
			}
			json_object_put(r.vms[i].progress);
			json_object_put(r.vms[i].result);
		}
		free(r.vms);
	}
	evac_plan_fini(&plan);
	if (r.sig_fd >= 0)
		close(r.sig_fd);
	return code;
}
