/*
 * dirtylog-bench: what harvesting the dirty log costs, per mode, guest
 * size and share of dirty pages.
 *
 * For each guest size and dirty share, one VM without a dirty ring (for
 * bitmap and bitmap-clear, one after the other) and one with a ring.  The
 * built-in guest (one vCPU, rate=max) rewrites a working set of the given
 * share of RAM.  Per run: resume the guest until it has rewritten its whole
 * working set since the last harvest, pause it, then time the harvest with
 * the vCPU out of the way:
 *   bitmap        sync (KVM_GET_DIRTY_LOG per slot)
 *   bitmap-clear  sync + clear of all RAM (KVM_CLEAR_DIRTY_LOG of what was
 *                 reported: the re-protection a sender pays before sending)
 *   ring          sync (harvest + KVM_RESET_DIRTY_RINGS) + the time vCPU
 *                 threads spent in the ring-full handler since the last
 *                 harvest (the ring fills while the guest runs: that work
 *                 is part of the harvest too)
 * Medians, minima and maxima over the runs go out as JSON.
 *
 * Guest RAM is sparse: only the working set, the guest image and what the
 * guest clears at boot are touched.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "vmig/dirtylog.h"
#include "vmig/guest-abi.h"
#include "vmig/vm.h"

#define MAX_RUNS   32
#define MAX_LIST   8

struct opts {
	uint64_t sizes_gib[MAX_LIST];
	unsigned int nr_sizes;
	double pcts[MAX_LIST];
	unsigned int nr_pcts;
	bool mode_on[4];
	unsigned int runs;
	uint32_t ring_entries;
	const char *out;
};

struct series {
	double v[MAX_RUNS];
	unsigned int n;
};

struct result {
	enum vmig_dirtylog_mode mode;
	uint64_t gib;
	double pct;
	uint64_t wss_pages;
	struct series harvest_ms, sync_ms, clear_ms, ring_full_ms, dirty;
	uint64_t ring_full;
	double start_ms, first_ms;
	bool skipped;
	char why[512];
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(unsigned int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000 };

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static void stats_of(const struct series *s, double *med, double *min, double *max)
{
	double v[MAX_RUNS];

	if (!s->n) {
		*med = *min = *max = 0;
		return;
	}
	memcpy(v, s->v, s->n * sizeof(double));
	qsort(v, s->n, sizeof(double), cmp_double);
	*min = v[0];
	*max = v[s->n - 1];
	*med = s->n % 2 ? v[s->n / 2] : (v[s->n / 2 - 1] + v[s->n / 2]) / 2;
}

static void die(const char *what, const struct vmig_err *err)
{
	fprintf(stderr, "dirtylog-bench: %s: %s\n", what, err ? err->msg : strerror(errno));
	exit(1);
}

static const volatile struct vmig_guest_status *status(struct vmig_vm *vm)
{
	return vmig_vm_gpa_to_hva(vm, VMIG_GUEST_STATUS_GPA, sizeof(struct vmig_guest_status));
}

static struct vmig_vm *make_vm(uint64_t mem, uint64_t wss, uint32_t ring)
{
	char workload[96];
	struct vmig_vm_config cfg = {
		.name = "dirtylog-bench",
		.mem_size = mem,
		.nr_vcpus = 1,
		.workload = workload,
		.console_fd = -1,
		.dirty_ring_entries = ring,
	};
	const volatile struct vmig_guest_status *st;
	struct vmig_err err = { 0 };
	struct vmig_vm *vm;
	uint64_t t0 = now_ns();

	snprintf(workload, sizeof(workload), "rate=max,wss=%" PRIu64 "K,quiet", wss >> 10);
	if (vmig_vm_create(&cfg, &vm, &err))
		die("cannot create the VM", &err);
	if (vmig_vm_start(vm, &err))
		die("cannot start the VM", &err);
	st = status(vm);
	/* The guest clears its working set first: that is first touch. */
	while (!(st->magic == VMIG_GUEST_STATUS_MAGIC && st->vcpu[0].pages_written > 0)) {
		if (vmig_vm_state(vm) == VMIG_VM_STOPPED) {
			fprintf(stderr, "dirtylog-bench: the guest stopped: %s\n",
				vmig_vm_stop_reason(vm));
			exit(1);
		}
		if (now_ns() - t0 > 600ull * 1000000000ull) {
			fprintf(stderr, "dirtylog-bench: the guest did not start in 10 min\n");
			exit(1);
		}
		sleep_ms(5);
	}
	return vm;
}

/* Resume until the guest rewrote its working set since @since, then pause. */
static void run_one_pass(struct vmig_vm *vm, uint64_t wss_pages, uint64_t *since)
{
	const volatile struct vmig_guest_status *st = status(vm);
	uint64_t t0 = now_ns();

	if (vmig_vm_resume(vm))
		die("resume", NULL);
	/* Even at 0 %, give the guest some time, like a real iteration. */
	sleep_ms(20);
	while (st->vcpu[0].pages_written - *since < wss_pages + 1) {
		if (now_ns() - t0 > 300ull * 1000000000ull) {
			fprintf(stderr, "dirtylog-bench: the guest made no progress\n");
			exit(1);
		}
		sleep_ms(1);
	}
	if (vmig_vm_pause(vm))
		die("pause", NULL);
	*since = st->vcpu[0].pages_written;
}

static void measure(struct result *res, struct vmig_vm *vm, unsigned int runs)
{
	const volatile struct vmig_guest_status *st = status(vm);
	struct vmig_dirtylog_stats s0, s1;
	struct vmig_err err = { 0 };
	struct vmig_dirtylog *dl;
	struct vmig_bitmap b;
	uint64_t t0, t1, t2, since, np;
	unsigned int r;

	if (vmig_dirtylog_create(vm, res->mode, &dl, &err)) {
		res->skipped = true;
		snprintf(res->why, sizeof(res->why), "%s", err.msg);
		return;
	}
	np = vmig_dirtylog_nr_pages(dl);
	if (vmig_bitmap_init(&b, np))
		die("out of memory", NULL);
	if (vmig_vm_pause(vm))
		die("pause", NULL);
	t0 = now_ns();
	if (vmig_dirtylog_start(dl, &err))
		die("cannot start dirty logging", &err);
	t1 = now_ns();
	/* The first harvest (INITIALLY_SET: every page), then the passes. */
	if (vmig_dirtylog_sync(dl, &b, &err) || vmig_dirtylog_clear(dl, 0, np, &err))
		die("first sync", &err);
	t2 = now_ns();
	res->start_ms = (t1 - t0) / 1e6;
	res->first_ms = (t2 - t1) / 1e6;
	since = st->vcpu[0].pages_written;
	/* One pass untimed: the first write of each page after start. */
	run_one_pass(vm, res->wss_pages, &since);
	vmig_bitmap_clear_all(&b);
	if (vmig_dirtylog_sync(dl, &b, &err) || vmig_dirtylog_clear(dl, 0, np, &err))
		die("sync", &err);

	for (r = 0; r < runs; r++) {
		uint64_t a, m, c;
		double handler_ms;

		vmig_dirtylog_get_stats(dl, &s0);
		run_one_pass(vm, res->wss_pages, &since);
		vmig_bitmap_clear_all(&b);
		a = now_ns();
		if (vmig_dirtylog_sync(dl, &b, &err))
			die("sync", &err);
		m = now_ns();
		if (vmig_dirtylog_clear(dl, 0, np, &err))
			die("clear", &err);
		c = now_ns();
		vmig_dirtylog_get_stats(dl, &s1);
		/* Ring-full handlers ran on the vCPU thread during the pass. */
		handler_ms = (s1.ring_full_ns - s0.ring_full_ns) / 1e6;
		res->sync_ms.v[r] = (m - a) / 1e6;
		res->clear_ms.v[r] = (c - m) / 1e6;
		res->ring_full_ms.v[r] = handler_ms;
		res->harvest_ms.v[r] = (c - a) / 1e6 + handler_ms;
		res->dirty.v[r] = (double)vmig_bitmap_count(&b);
		res->sync_ms.n = res->clear_ms.n = res->dirty.n = r + 1;
		res->ring_full_ms.n = res->harvest_ms.n = r + 1;
	}
	vmig_dirtylog_get_stats(dl, &s1);
	res->ring_full = s1.ring_full;
	vmig_dirtylog_destroy(dl);
	vmig_bitmap_fini(&b);
	if (vmig_vm_resume(vm))
		die("resume", NULL);
}

static void emit(FILE *f, const char *name, const struct series *s, bool last)
{
	double med, min, max;

	stats_of(s, &med, &min, &max);
	fprintf(f, "\"%s\": {\"median\": %.4f, \"min\": %.4f, \"max\": %.4f}%s", name, med,
		min, max, last ? "" : ", ");
}

static int parse_list_u64(const char *s, uint64_t *out, unsigned int *n)
{
	char *end;

	*n = 0;
	while (*s && *n < MAX_LIST) {
		out[(*n)++] = strtoull(s, &end, 10);
		if (end == s || (*end && *end != ','))
			return -1;
		s = *end ? end + 1 : end;
	}
	return *n ? 0 : -1;
}

static int parse_list_double(const char *s, double *out, unsigned int *n)
{
	char *end;

	*n = 0;
	while (*s && *n < MAX_LIST) {
		out[(*n)++] = strtod(s, &end);
		if (end == s || (*end && *end != ','))
			return -1;
		s = *end ? end + 1 : end;
	}
	return *n ? 0 : -1;
}

static void usage(FILE *f)
{
	fprintf(f, "usage: dirtylog-bench [--sizes GIB,..] [--dirty PCT,..] [--modes M,..]\n"
		"                      [--runs N] [--ring-entries N] [--out FILE]\n"
		"defaults: --sizes 1,4,16 --dirty 0,1,10 --modes bitmap,bitmap-clear,ring\n"
		"          --runs 5 --ring-entries %u\n", VMIG_DIRTYLOG_RING_DEFAULT);
}

int main(int argc, char **argv)
{
	static const struct option lopts[] = {
		{ "sizes", required_argument, NULL, 's' },
		{ "dirty", required_argument, NULL, 'd' },
		{ "modes", required_argument, NULL, 'm' },
		{ "runs", required_argument, NULL, 'r' },
		{ "ring-entries", required_argument, NULL, 'R' },
		{ "out", required_argument, NULL, 'o' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct opts o = {
		.sizes_gib = { 1, 4, 16 }, .nr_sizes = 3,
		.pcts = { 0, 1, 10 }, .nr_pcts = 3,
		.mode_on = { false, true, true, true },
		.runs = 5, .ring_entries = VMIG_DIRTYLOG_RING_DEFAULT,
	};
	struct vmig_dirtylog_plan plan;
	struct result *res;
	unsigned int nres = 0, si, pi, i, c;
	struct utsname u;
	uint64_t t_start = now_ns();
	FILE *f = stdout;

	while ((c = (unsigned int)getopt_long(argc, argv, "s:d:m:r:R:o:h", lopts, NULL)) != (unsigned int)-1) {
		switch (c) {
		case 's':
			if (parse_list_u64(optarg, o.sizes_gib, &o.nr_sizes))
				goto bad;
			break;
		case 'd':
			if (parse_list_double(optarg, o.pcts, &o.nr_pcts))
				goto bad;
			break;
		case 'm': {
			char *copy = strdup(optarg), *tok, *save = NULL;
			enum vmig_dirtylog_mode m;

			memset(o.mode_on, 0, sizeof(o.mode_on));
			for (tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
				if (vmig_dirtylog_mode_parse(tok, &m) || m == VMIG_DIRTYLOG_AUTO)
					goto bad;
				o.mode_on[m] = true;
			}
			free(copy);
			break;
		}
		case 'r':
			o.runs = (unsigned int)atoi(optarg);
			if (o.runs < 1 || o.runs > MAX_RUNS)
				goto bad;
			break;
		case 'R':
			o.ring_entries = (uint32_t)strtoul(optarg, NULL, 10);
			break;
		case 'o':
			o.out = optarg;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			goto bad;
		}
	}

	res = calloc(o.nr_sizes * o.nr_pcts * 3, sizeof(*res));
	if (!res)
		die("out of memory", NULL);
	for (si = 0; si < o.nr_sizes; si++) {
		uint64_t mem = o.sizes_gib[si] << 30;

		for (pi = 0; pi < o.nr_pcts; pi++) {
			uint64_t wss = (uint64_t)(mem * o.pcts[pi] / 100) & ~4095ull;
			struct vmig_vm *vm;

			if (wss < 4096)
				wss = 4096;
			/* bitmap and bitmap-clear on one VM, without a ring. */
			if (o.mode_on[VMIG_DIRTYLOG_BITMAP] || o.mode_on[VMIG_DIRTYLOG_BITMAP_CLEAR]) {
				vm = make_vm(mem, wss, 0);
				for (i = VMIG_DIRTYLOG_BITMAP; i <= VMIG_DIRTYLOG_BITMAP_CLEAR; i++) {
					struct result *r = &res[nres];

					if (!o.mode_on[i])
						continue;
					r->mode = (enum vmig_dirtylog_mode)i;
					r->gib = o.sizes_gib[si];
					r->pct = o.pcts[pi];
					r->wss_pages = wss / 4096;
					fprintf(stderr, "dirtylog-bench: %s, %" PRIu64 " GiB, %g %% ...\n",
						vmig_dirtylog_mode_name(r->mode), r->gib, r->pct);
					measure(r, vm, o.runs);
					nres++;
				}
				vmig_vm_destroy(vm);
			}
			if (o.mode_on[VMIG_DIRTYLOG_RING]) {
				struct result *r = &res[nres++];
				struct vmig_err err = { 0 };

				r->mode = VMIG_DIRTYLOG_RING;
				r->gib = o.sizes_gib[si];
				r->pct = o.pcts[pi];
				r->wss_pages = wss / 4096;
				if (vmig_dirtylog_probe(VMIG_DIRTYLOG_RING, o.ring_entries, &plan, &err)) {
					r->skipped = true;
					snprintf(r->why, sizeof(r->why), "%s", err.msg);
					continue;
				}
				fprintf(stderr, "dirtylog-bench: ring, %" PRIu64 " GiB, %g %% ...\n",
					r->gib, r->pct);
				vm = make_vm(mem, wss, plan.ring_entries);
				measure(r, vm, o.runs);
				vmig_vm_destroy(vm);
			}
		}
	}

	if (o.out && !(f = fopen(o.out, "w")))
		die(o.out, NULL);
	uname(&u);
	fprintf(f, "{\n  \"benchmark\": \"dirtylog\",\n  \"host\": {\"kernel\": \"%s\", "
		"\"cpus\": %ld},\n  \"runs\": %u,\n  \"ring_entries\": %u,\n"
		"  \"guest\": \"built-in, 1 vCPU, rate=max, paused while harvesting\",\n"
		"  \"seconds\": %.1f,\n  \"results\": [\n", u.release,
		sysconf(_SC_NPROCESSORS_ONLN), o.runs, o.ring_entries,
		(now_ns() - t_start) / 1e9);
	for (i = 0; i < nres; i++) {
		struct result *r = &res[i];

		fprintf(f, "    {\"mode\": \"%s\", \"guest_gib\": %" PRIu64 ", \"dirty_pct\": %g, ",
			vmig_dirtylog_mode_name(r->mode), r->gib, r->pct);
		if (r->skipped) {
			fprintf(f, "\"skipped\": \"%s\"}%s\n", r->why, i + 1 < nres ? "," : "");
			continue;
		}
		fprintf(f, "\"working_set_pages\": %" PRIu64 ", ", r->wss_pages);
		emit(f, "dirty_pages", &r->dirty, false);
		emit(f, "harvest_ms", &r->harvest_ms, false);
		emit(f, "sync_ms", &r->sync_ms, false);
		emit(f, "clear_ms", &r->clear_ms, false);
		emit(f, "ring_full_ms", &r->ring_full_ms, false);
		fprintf(f, "\"ring_full_exits\": %" PRIu64 ", \"start_ms\": %.3f, "
			"\"first_harvest_ms\": %.3f}%s\n", r->ring_full, r->start_ms, r->first_ms,
			i + 1 < nres ? "," : "");
	}
	fprintf(f, "  ]\n}\n");
	if (f != stdout)
		fclose(f);
	free(res);
	return 0;
bad:
	usage(stderr);
	return 2;
}
