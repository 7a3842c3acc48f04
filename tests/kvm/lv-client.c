/*
 * A libvirt API client for tests/kvm/test_libvirt.c: migrate one VM
 * peer-to-peer with virDomainMigrateToURI3() and typed parameters while a
 * second thread polls virDomainGetJobStats() on the same connection.
 *
 * Usage: lv-client URI NAME DESTURI DNAME BANDWIDTH_MIBS PARALLEL
 * Prints "polls=N unbounded=N complete=N max_processed=N total=N iteration=N
 * jobinfo=N" (unbounded: job stats that saw the migration, complete: with
 * every field a migration reports, jobinfo: virDomainGetJobInfo() calls
 * that saw it) and
 * "migrate=ok" or "migrate=error: MESSAGE"; exits 0 only if the migration
 * succeeded.
 *
 * Usage: lv-client defined URI
 * Prints "num=N names=A,B," from the old API's virConnectNumOfDefinedDomains()
 * and virConnectListDefinedDomains() (what clients before
 * virConnectListAllDomains() ask).
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>

static virDomainPtr dom;
static volatile int done;
static unsigned long polls, unbounded, complete, jobinfo;
static unsigned long long max_processed, total, iteration;
static double max_poll_ms, t_first, t_last;

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void *event_loop(void *arg)
{
	(void)arg;
	while (!done)
		virEventRunDefaultImpl();
	return NULL;
}

static void *poll_stats(void *arg)
{
	(void)arg;
	while (!done) {
		virTypedParameterPtr params = NULL;
		int nparams = 0, type = -1;
		struct timespec ts = { 0, 1000000 };   /* 1 ms: many polls in a short migration */
		double t0 = now_ms();

		if (virDomainGetJobStats(dom, &type, &params, &nparams, 0) == 0) {
			unsigned long long v;

			polls++;
			if (type == VIR_DOMAIN_JOB_UNBOUNDED) {
				int op = -1;

				unbounded++;
				/* Every field a migration job reports is there. */
				if (virTypedParamsGetInt(params, nparams, VIR_DOMAIN_JOB_OPERATION,
							 &op) == 1 &&
				    op == VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT &&
				    virTypedParamsGetULLong(params, nparams,
							    VIR_DOMAIN_JOB_TIME_ELAPSED, &v) == 1 &&
				    virTypedParamsGetULLong(params, nparams,
							    VIR_DOMAIN_JOB_DATA_TOTAL, &v) == 1 &&
				    virTypedParamsGetULLong(params, nparams,
							    VIR_DOMAIN_JOB_DATA_REMAINING, &v) == 1 &&
				    virTypedParamsGetULLong(params, nparams,
							    VIR_DOMAIN_JOB_MEMORY_BPS, &v) == 1 &&
				    virTypedParamsGetULLong(params, nparams,
							    VIR_DOMAIN_JOB_MEMORY_DIRTY_RATE, &v) == 1 &&
				    virTypedParamsGetULLong(params, nparams,
							    VIR_DOMAIN_JOB_DOWNTIME, &v) == 1)
					complete++;
				if (virTypedParamsGetULLong(params, nparams,
							    VIR_DOMAIN_JOB_DATA_PROCESSED, &v) == 1 &&
				    v > max_processed)
					max_processed = v;
				if (virTypedParamsGetULLong(params, nparams,
							    VIR_DOMAIN_JOB_MEMORY_TOTAL, &v) == 1)
					total = v;
				if (virTypedParamsGetULLong(params, nparams,
							    VIR_DOMAIN_JOB_MEMORY_ITERATION, &v) == 1 &&
				    v > iteration)
					iteration = v;
			}
			virTypedParamsFree(params, nparams);
		}
		{
			/* The older call, answered from the same progress. */
			virDomainJobInfo info;

			if (virDomainGetJobInfo(dom, &info) == 0 && info.type == VIR_DOMAIN_JOB_UNBOUNDED &&
			    info.memProcessed == info.dataProcessed)
				jobinfo++;
		}
		if (now_ms() - t0 > max_poll_ms)
			max_poll_ms = now_ms() - t0;
		if (!t_first)
			t_first = t0;
		t_last = now_ms();
		nanosleep(&ts, NULL);
	}
	return NULL;
}

static int list_defined(const char *uri)
{
	virConnectPtr conn = virConnectOpen(uri);
	char *names[64];
	int num, n, i;

	if (!conn) {
		fprintf(stderr, "cannot open %s: %s\n", uri, virGetLastErrorMessage());
		return 1;
	}
	num = virConnectNumOfDefinedDomains(conn);
	n = virConnectListDefinedDomains(conn, names, 64);
	if (num < 0 || n < 0) {
		fprintf(stderr, "defined domains: %s\n", virGetLastErrorMessage());
		virConnectClose(conn);
		return 1;
	}
	printf("num=%d names=", num);
	for (i = 0; i < n; i++) {
		printf("%s,", names[i]);
		free(names[i]);
	}
	printf("\n");
	virConnectClose(conn);
	return 0;
}

int main(int argc, char **argv)
{
	virTypedParameterPtr params = NULL;
	int nparams = 0, maxparams = 0, ret;
	unsigned int flags = VIR_MIGRATE_LIVE | VIR_MIGRATE_PEER2PEER | VIR_MIGRATE_PERSIST_DEST |
			     VIR_MIGRATE_UNDEFINE_SOURCE | VIR_MIGRATE_COMPRESSED |
			     VIR_MIGRATE_PARALLEL;
	virConnectPtr conn;
	pthread_t tid, loop;
	double t0, t1;

	if (argc == 3 && !strcmp(argv[1], "defined"))
		return list_defined(argv[2]);
	if (argc != 7) {
		fprintf(stderr, "usage: lv-client URI NAME DESTURI DNAME BANDWIDTH_MIBS PARALLEL\n");
		return 2;
	}
	/* An event loop, as long-running clients have: it also runs the
	 * keepalive (1 s interval, 3 missed: a silent endpoint is dropped). */
	if (virEventRegisterDefaultImpl() < 0 || pthread_create(&loop, NULL, event_loop, NULL))
		return 1;
	conn = virConnectOpen(argv[1]);
	if (!conn) {
		fprintf(stderr, "cannot open %s: %s\n", argv[1], virGetLastErrorMessage());
		return 1;
	}
	if (virConnectSetKeepAlive(conn, 1, 3) < 0) {
		fprintf(stderr, "keepalive: %s\n", virGetLastErrorMessage());
		return 1;
	}
	dom = virDomainLookupByName(conn, argv[2]);
	if (!dom) {
		fprintf(stderr, "no domain %s: %s\n", argv[2], virGetLastErrorMessage());
		return 1;
	}
	if (virTypedParamsAddString(&params, &nparams, &maxparams, VIR_MIGRATE_PARAM_DEST_NAME,
				    argv[4]) < 0 ||
	    virTypedParamsAddULLong(&params, &nparams, &maxparams, VIR_MIGRATE_PARAM_BANDWIDTH,
				    strtoull(argv[5], NULL, 10)) < 0 ||
	    virTypedParamsAddInt(&params, &nparams, &maxparams,
				 VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS, atoi(argv[6])) < 0 ||
	    virTypedParamsAddString(&params, &nparams, &maxparams, VIR_MIGRATE_PARAM_COMPRESSION,
				    "lz4") < 0)
		return 1;
	if (pthread_create(&tid, NULL, poll_stats, NULL) != 0)
		return 1;
	t0 = now_ms();
	ret = virDomainMigrateToURI3(dom, argv[3], params, (unsigned int)nparams, flags);
	t1 = now_ms();
	done = 1;
	pthread_join(tid, NULL);
	printf("polls=%lu unbounded=%lu complete=%lu max_processed=%llu total=%llu "
	       "iteration=%llu jobinfo=%lu migrate_ms=%.0f max_poll_ms=%.0f polling_ms=%.0f\n",
	       polls, unbounded, complete, max_processed, total, iteration, jobinfo, t1 - t0,
	       max_poll_ms, t_last - t_first);
	if (ret < 0)
		printf("migrate=error: %s\n", virGetLastErrorMessage());
	else
		printf("migrate=ok\n");
	virTypedParamsFree(params, nparams);
	virDomainFree(dom);
	virConnectClose(conn);
	return ret < 0 ? 1 : 0;
}
