/*
 * Client side of migrations: vmig migrate, vmig save, vmig cancel.
 *
 * The migration runs inside the source VM's VMM process; this command
 * asks for it over the control socket, then reads the progress events the
 * VMM streams back on the same connection until the final result.
 * Ctrl-C (SIGINT/SIGTERM) sends "cancel" on a second connection and keeps
 * reading: the result says whether the cancel came in time (before
 * COMMIT) and the VM runs here, or the migration completed anyway.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <json-c/json.h>

#include "vmig/migrate.h"
#include "vmig/util.h"
#include "cli.h"

static volatile sig_atomic_t interrupted;

static void on_signal(int sig)
{
	(void)sig;
	interrupted = 1;
}

static void fmt_rate(uint64_t bps, char *buf, size_t len)
{
	char s[24];

	vmig_size_format(bps, s, sizeof(s));
	snprintf(buf, len, "%s/s", s);
}

static void print_progress(struct json_object *ev, bool tty)
{
	char sent[32], rem[32], bw[40], eta[32], thr[32] = "";

	vmig_size_format(ju64(ev, "transferred_bytes"), sent, sizeof(sent));
	vmig_size_format(ju64(ev, "remaining_bytes"), rem, sizeof(rem));
	fmt_rate(ju64(ev, "bandwidth_bps"), bw, sizeof(bw));
	vmig_duration_format(ju64(ev, "eta_ms"), eta, sizeof(eta));
	if (ju64(ev, "throttle_pct"))
		snprintf(thr, sizeof(thr), "  throttled %" PRIu64 " %%", ju64(ev, "throttle_pct"));
	fprintf(stderr, "%siter %" PRIu64 "  sent %s  remaining %s  dirty %" PRIu64
		" pages/s  %s  expected downtime %" PRIu64 " ms  eta %s%s%s",
		tty ? "\r\033[K" : "", ju64(ev, "iteration"), sent, rem,
		ju64(ev, "dirty_rate_pps"), bw, ju64(ev, "expected_downtime_ms"),
		ju64(ev, "eta_ms") ? eta : "-", thr, tty ? "" : "\n");
}

static void print_summary(struct json_object *ev, const char *what)
{
	struct json_object *pages;
	char total[32], bytes[32];

	vmig_duration_format(ju64(ev, "total_time_ms"), total, sizeof(total));
	vmig_size_format(ju64(ev, "transferred_bytes"), bytes, sizeof(bytes));
	printf("%s %s in %s: downtime %" PRIu64 " ms, %s sent in %" PRIu64 " iteration%s",
	       what, jstr(ev, "status", "?"), total, ju64(ev, "downtime_ms"), bytes,
	       ju64(ev, "iterations"), ju64(ev, "iterations") == 1 ? "" : "s");
	if (json_object_object_get_ex(ev, "pages", &pages))
		printf("; pages: %" PRIu64 " zero, %" PRIu64 " raw, %" PRIu64 " lz4",
		       ju64(pages, "zero"), ju64(pages, "raw"), ju64(pages, "lz4"));
	if (ju64(ev, "throttle_pct"))
		printf("; guest throttled to %" PRIu64 " %% at the end", ju64(ev, "throttle_pct"));
	printf("\n");
}

/*
 * Send @req (consumed) to VM @name and follow its events to the result.
 * Returns the exit code.
 */
static int follow(const char *name, struct json_object *req, bool json, const char *what,
		  bool wait_exit)
{
	struct vmig_ctl_reader rd;
	struct json_object *msg = NULL;
	struct sigaction sa;
	char path[4096];
	const char *err = NULL;
	bool tty = isatty(STDERR_FILENO) && !json, cancel_sent = false, progress_shown = false;
	int fd, ret, code = VMIG_EXIT_ERROR;

	if (cli_vm_path(name, "sock", path, sizeof(path)) < 0) {
		json_object_put(req);
		return VMIG_EXIT_ERROR;
	}
	ret = vmig_ctl_connect(path, &fd);
	if (ret < 0) {
		json_object_put(req);
		if (ret == -ENOENT || ret == -ECONNREFUSED)
			cli_error("no VM named '%s' is running (nothing answers at %s)", name, path);
		else
			cli_error("cannot talk to VM '%s': %s", name, strerror(-ret));
		return VMIG_EXIT_ERROR;
	}
	ret = vmig_ctl_send(fd, req);
	json_object_put(req);
	if (ret < 0) {
		cli_error("cannot talk to VM '%s': %s", name, strerror(-ret));
		close(fd);
		return VMIG_EXIT_ERROR;
	}

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;     /* no SA_RESTART: reads return EINTR */
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	vmig_ctl_reader_init(&rd, fd);
	ret = vmig_ctl_recv(&rd, &msg);
	if (ret == 0 && vmig_ctl_reply_status(msg, &err) < 0) {
		cli_error("%s: %s", name, err ? err : "refused");
		goto out;
	}
	if (ret < 0) {
		cli_error("VM '%s' closed the control connection: %s", name, strerror(-ret));
		goto out;
	}
	for (;;) {
		const char *ev;

		json_object_put(msg);
		msg = NULL;
		if (interrupted && !cancel_sent) {
			struct json_object *r = NULL;

			fprintf(stderr, "%svmig: cancelling the %s of '%s'...\n",
				progress_shown && tty ? "\n" : "", what, name);
			vmig_ctl_call(path, vmig_ctl_request("cancel"), &r);
			json_object_put(r);
			cancel_sent = true;
		}
		ret = vmig_ctl_recv(&rd, &msg);
		if (ret == -EINTR)
			continue;
		if (ret < 0) {
			cli_error("lost VM '%s' during the %s: %s", name, what, strerror(-ret));
			goto out;
		}
		ev = jstr(msg, "event", "");
		if (!strcmp(ev, "progress")) {
			if (!json) {
				print_progress(msg, tty);
				progress_shown = true;
			}
			continue;
		}
		if (strcmp(ev, "result"))
			continue;
		if (progress_shown && tty)
			fputc('\n', stderr);
		json_object_object_del(msg, "event");
		if (json)
			printf("%s\n", json_object_to_json_string_ext(msg, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
		else
			print_summary(msg, what);
		if (!strcmp(jstr(msg, "status", ""), "completed")) {
			code = VMIG_EXIT_OK;
			/* The source VMM lets go of the VM: wait until it is gone, so
			 * that the name is free here when this returns. */
			if (wait_exit && cli_wait_gone(name, 30000) < 0)
				cli_error("the VMM of '%s' did not exit after the %s", name, what);
		} else {
			const char *st = jstr(msg, "status", "");

			cli_error("%s %s%s%s", what, st, jstr(msg, "error", NULL) ? ": " : "",
				  jstr(msg, "error", ""));
			if (!strcmp(st, "handoff-uncertain"))
				fprintf(stderr, "The VM is paused on this host and may run on the "
					"destination.  Check there with 'vmig status'; then run "
					"'vmig resume --force %s' here if it does not run there, "
					"or 'vmig stop %s' if it does.\n", name, name);
			else
				fprintf(stderr, "VM '%s' keeps running on this host.\n", name);
		}
		break;
	}
out:
	json_object_put(msg);
	vmig_ctl_reader_fini(&rd);
	close(fd);
	return code;
}

static int parse_u32(const char *cmd, const char *opt, const char *s, uint32_t *out)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || *end || !*s || *s == '-' || v > UINT32_MAX)
		return cli_usage_error(cmd, "bad %s '%s': give a whole number", opt, s);
	*out = (uint32_t)v;
	return 0;
}

enum {
	OPT_REMOTE_VMIG = 256,
	OPT_DEST_NAME,
	OPT_KNOWN_HOSTS,
	OPT_ACCEPT_NEW,
	OPT_MAX_THROTTLE,
	OPT_NO_AUTO_CONVERGE,
	OPT_CHANNELS,
	OPT_STREAM_VERSION,
};

/* @path made absolute (the VMM has its own working directory). */
static int absolute_path(const char *opt, const char *path, char *out, size_t len)
{
	char cwd[PATH_MAX];

	if (path[0] == '/') {
		snprintf(out, len, "%s", path);
		return 0;
	}
	if (!getcwd(cwd, sizeof(cwd))) {
		cli_error("%s %s: cannot get the current directory: %s", opt, path, strerror(errno));
		return -1;
	}
	if ((size_t)snprintf(out, len, "%s/%s", cwd, path) >= len) {
		cli_error("%s %s: path too long", opt, path);
		return -1;
	}
	return 0;
}

/*
 * The "ssh" member of a migrate request: what the VMM needs to log in as
 * this user, whose ssh-agent is the one of this shell, not of the VMM's.
 */
static struct json_object *ssh_request(const char *remote_vmig, const char *dest_name,
				       const char *known_hosts, bool accept_new,
				       const char *identity)
{
	struct json_object *o = json_object_new_object();
	const char *agent = getenv("SSH_AUTH_SOCK");
	char path[PATH_MAX + 1];

	if (remote_vmig)
		json_object_object_add(o, "remote_vmig", json_object_new_string(remote_vmig));
	if (dest_name)
		json_object_object_add(o, "dest_name", json_object_new_string(dest_name));
	if (known_hosts) {
		if (absolute_path("--known-hosts", known_hosts, path, sizeof(path)) < 0)
			goto fail;
		json_object_object_add(o, "known_hosts", json_object_new_string(path));
	}
	if (identity) {
		if (!realpath(identity, path) || access(path, R_OK) < 0) {
			cli_error("cannot read --identity %s: %s", identity, strerror(errno));
			goto fail;
		}
		json_object_object_add(o, "identity", json_object_new_string(path));
	}
	json_object_object_add(o, "agent_socket", json_object_new_string(agent ? agent : ""));
	json_object_object_add(o, "accept_new_host_key", json_object_new_boolean(accept_new));
	return o;
fail:
	json_object_put(o);
	return NULL;
}

/*
 * --channels auto: over tcp:// and unix:, a connection per CPU of this
 * host, at most 4 (each has a sender thread here and a
 * receiver there; on 2 cores, 2 connections cut W2 from 513 to 412 ms and
 * W4 from 414 to 368 ms).  Over ssh:// each would be a log-in of its own,
 * and rdma:// has one queue pair: 1.
 */
static uint32_t auto_channels(const char *uri)
{
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);

	if (strncmp(uri, "tcp://", 6) && strncmp(uri, "unix:", 5))
		return 1;
	return cpus < 1 ? 1 : cpus > 4 ? 4 : (uint32_t)cpus;
}

int cmd_migrate(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "max-downtime", required_argument, NULL, 'D' },
		{ "timeout",      required_argument, NULL, 't' },
		{ "on-timeout",   required_argument, NULL, 'o' },
		{ "no-compress",  no_argument,       NULL, 'n' },
		{ "compress",     required_argument, NULL, 'c' },
		{ "bandwidth",    required_argument, NULL, 'b' },
		{ "channels",     required_argument, NULL, OPT_CHANNELS },
		{ "stream-version", required_argument, NULL, OPT_STREAM_VERSION },
		{ "max-throttle", required_argument, NULL, OPT_MAX_THROTTLE },
		{ "no-auto-converge", no_argument,   NULL, OPT_NO_AUTO_CONVERGE },
		{ "resume",       no_argument,       NULL, 'r' },
		{ "json",         no_argument,       NULL, 'j' },
		{ "remote-vmig",  required_argument, NULL, OPT_REMOTE_VMIG },
		{ "dest-name",    required_argument, NULL, OPT_DEST_NAME },
		{ "known-hosts",  required_argument, NULL, OPT_KNOWN_HOSTS },
		{ "accept-new-host-key", no_argument, NULL, OPT_ACCEPT_NEW },
		{ "identity",     required_argument, NULL, 'i' },
		{ "help",         no_argument,       NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	uint32_t downtime = 300, timeout = 0, max_throttle = 99, channels = 0;   /* 0: auto */
	uint32_t stream_version = 2;
	uint64_t bandwidth = 0;
	const char *on_timeout = "cancel", *compress = "auto";
	const char *remote_vmig = NULL, *dest_name = NULL, *known_hosts = NULL, *identity = NULL;
	const char *ssh_opt = NULL;
	bool json = false, resume = false, accept_new = false;
	struct json_object *req, *ssh = NULL;
	int c, ret;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":D:t:o:nc:b:rji:h", longopts, NULL)) != -1) {
		switch (c) {
		case 'D':
			ret = parse_u32("migrate", "--max-downtime", optarg, &downtime);
			if (ret)
				return ret;
			if (!downtime)
				return cli_usage_error("migrate", "--max-downtime must be at least 1 ms");
			break;
		case 't':
			ret = parse_u32("migrate", "--timeout", optarg, &timeout);
			if (ret)
				return ret;
			break;
		case 'o':
			if (strcmp(optarg, "cancel") && strcmp(optarg, "force"))
				return cli_usage_error("migrate", "bad --on-timeout '%s': use "
						       "cancel or force", optarg);
			on_timeout = optarg;
			break;
		case 'n':
			compress = "none";
			break;
		case 'c':
			if (strcmp(optarg, "auto") && strcmp(optarg, "lz4") && strcmp(optarg, "none"))
				return cli_usage_error("migrate", "bad --compress '%s': use auto, "
						       "lz4 or none", optarg);
			compress = optarg;
			break;
		case 'b':
			if (vmig_size_parse(optarg, &bandwidth) < 0 || !bandwidth)
				return cli_usage_error("migrate", "bad --bandwidth '%s': bytes per "
						       "second, e.g. 500M or 1G", optarg);
			break;
		case OPT_MAX_THROTTLE:
			ret = parse_u32("migrate", "--max-throttle", optarg, &max_throttle);
			if (ret)
				return ret;
			if (max_throttle > 99)
				return cli_usage_error("migrate", "--max-throttle must be 0 to 99 %%");
			break;
		case OPT_NO_AUTO_CONVERGE:
			max_throttle = 0;
			break;
		case OPT_CHANNELS:
			if (!strcmp(optarg, "auto")) {
				channels = 0;
				break;
			}
			ret = parse_u32("migrate", "--channels", optarg, &channels);
			if (ret)
				return ret;
			if (channels < 1 || channels > VMIG_MIGRATE_MAX_CHANNELS)
				return cli_usage_error("migrate", "--channels must be 1 to %u",
						       VMIG_MIGRATE_MAX_CHANNELS);
			break;
		case OPT_STREAM_VERSION:
			ret = parse_u32("migrate", "--stream-version", optarg, &stream_version);
			if (ret)
				return ret;
			if (stream_version < 1 || stream_version > 2)
				return cli_usage_error("migrate", "--stream-version must be 1 or 2");
			break;
		case 'r':
			resume = true;
			break;
		case 'j':
			json = true;
			break;
		case OPT_REMOTE_VMIG:
			if (!*optarg)
				return cli_usage_error("migrate", "--remote-vmig needs a command");
			remote_vmig = optarg;
			ssh_opt = "--remote-vmig";
			break;
		case OPT_DEST_NAME:
			if (vmig_vm_name_valid(optarg) < 0)
				return cli_usage_error("migrate", "bad --dest-name '%s'", optarg);
			dest_name = optarg;
			ssh_opt = "--dest-name";
			break;
		case OPT_KNOWN_HOSTS:
			known_hosts = optarg;
			ssh_opt = "--known-hosts";
			break;
		case OPT_ACCEPT_NEW:
			accept_new = true;
			ssh_opt = "--accept-new-host-key";
			break;
		case 'i':
			identity = optarg;
			ssh_opt = "--identity";
			break;
		case 'h':
			printf("Usage: vmig migrate NAME URI [--max-downtime MS] [--timeout S "
			       "--on-timeout cancel|force]\n"
			       "                    [--compress auto|lz4|none] [--bandwidth RATE] [--channels N|auto]\n"
			       "                    [--stream-version 1|2]\n"
			       "                    [--max-throttle PCT | --no-auto-converge] [--resume] [--json]\n"
			       "                    [--remote-vmig CMD] [--dest-name NAME] "
			       "[--known-hosts FILE]\n"
			       "                    [--accept-new-host-key] [--identity FILE]\n\n"
			       "Live-migrate VM NAME to a 'vmig incoming' listening at URI\n"
			       "(tcp://HOST:PORT or unix:PATH), or through SSH to HOST, where\n"
			       "'vmig incoming --stdio' is started (ssh://[USER@]HOST[:PORT]).\n"
			       "Ctrl-C cancels: the VM keeps running here.\n\n"
			       "  -D, --max-downtime MS  pause the guest at most about this long (default 300)\n"
			       "  -t, --timeout S        act if not converged after S seconds (default: never)\n"
			       "  -o, --on-timeout WHAT  cancel (default) or force the switchover\n"
			       "  -c, --compress MODE    auto (default: lz4 while it pays), lz4 or none\n"
			       "  -n, --no-compress      the same as --compress none\n"
			       "  -b, --bandwidth RATE   cap pre-copy at RATE bytes/s (500M, 1G; default none)\n"
			       "      --max-throttle PCT auto-converge: slow the guest's vCPUs down by up\n"
			       "                         to PCT %% when it dirties faster than the link\n"
			       "                         carries (default 99)\n"
			       "      --no-auto-converge never slow the guest down (--max-throttle 0)\n"
			       "      --channels N|auto  send pages over N connections, each with its own\n"
			       "                         thread (tcp://, unix:, ssh://); auto (default):\n"
			       "                         one per CPU here, up to 4, over tcp:// and unix:\n"
			       "      --stream-version 1 for a destination running vmig 0.1.0 from before\n"
			       "                         stream version 2 (default 2)\n"
			       "  -r, --resume           a paused VM runs on arrival\n"
			       "  -j, --json             print one JSON object with the result\n\n"
			       "ssh:// only:\n"
			       "      --remote-vmig CMD  run CMD instead of 'vmig' on HOST (a path, or\n"
			       "                         'env VAR=... /path/vmig'; the remote shell runs it)\n"
			       "      --dest-name NAME   name the VM NAME on HOST (default: its name here)\n"
			       "      --known-hosts FILE check HOST's key in FILE (default ~/.ssh/known_hosts)\n"
			       "      --accept-new-host-key  record the key of a host not in known_hosts\n"
			       "                         (never one that changed)\n"
			       "  -i, --identity FILE    log in with this private key after the ssh-agent's\n"
			       "                         (default ~/.ssh/id_ed25519, id_ecdsa, id_rsa)\n");
			return VMIG_EXIT_OK;
		case ':':
			return cli_usage_error("migrate", "option '%s' needs a value", argv[optind - 1]);
		default:
			return cli_usage_error("migrate", "unknown option '%s'", argv[optind - 1]);
		}
	}
	if (argc - optind != 2)
		return cli_usage_error("migrate", argc - optind < 2 ? "need NAME and URI" :
				       "too many arguments");
	if (strncmp(argv[optind + 1], "tcp://", 6) && strncmp(argv[optind + 1], "unix:", 5) &&
	    strncmp(argv[optind + 1], "ssh://", 6) && strncmp(argv[optind + 1], "rdma://", 7))
		return cli_usage_error("migrate", "bad URI '%s': use tcp://HOST:PORT, unix:PATH, "
				       "ssh://[USER@]HOST[:PORT] or rdma://HOST:PORT (to write a "
				       "file, use vmig save)", argv[optind + 1]);
	if (channels > 1 && !strncmp(argv[optind + 1], "rdma://", 7))
		return cli_usage_error("migrate", "--channels needs tcp://, unix: or ssh://");
	if (channels == 0)
		channels = auto_channels(argv[optind + 1]);
	if (!strncmp(argv[optind + 1], "ssh://", 6)) {
		ssh = ssh_request(remote_vmig, dest_name, known_hosts, accept_new, identity);
		if (!ssh)
			return VMIG_EXIT_ERROR;
	} else if (ssh_opt) {
		return cli_usage_error("migrate", "%s is for ssh:// URIs only", ssh_opt);
	}
	req = vmig_ctl_request("migrate");
	if (ssh)
		json_object_object_add(req, "ssh", ssh);
	json_object_object_add(req, "uri", json_object_new_string(argv[optind + 1]));
	json_object_object_add(req, "max_downtime_ms", json_object_new_int64(downtime));
	json_object_object_add(req, "timeout_s", json_object_new_int64(timeout));
	json_object_object_add(req, "on_timeout", json_object_new_string(on_timeout));
	json_object_object_add(req, "compress", json_object_new_string(compress));
	if (bandwidth)
		json_object_object_add(req, "bandwidth_bps", json_object_new_int64((int64_t)bandwidth));
	json_object_object_add(req, "max_throttle", json_object_new_int64(max_throttle));
	if (channels > 1)
		json_object_object_add(req, "channels", json_object_new_int64(channels));
	json_object_object_add(req, "resume", json_object_new_boolean(resume));
	if (stream_version != 2)
		json_object_object_add(req, "stream_version", json_object_new_int64(stream_version));
	return follow(argv[optind], req, json, "migration", true);
}

int cmd_save(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "keep-running", no_argument, NULL, 'k' },
		{ "json",         no_argument, NULL, 'j' },
		{ "help",         no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	bool json = false, keep = false;
	struct json_object *req;
	char dir[PATH_MAX], *d, *b, full[PATH_MAX * 2 + 2];
	int c;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "kjh", longopts, NULL)) != -1) {
		switch (c) {
		case 'k':
			keep = true;
			break;
		case 'j':
			json = true;
			break;
		case 'h':
			printf("Usage: vmig save NAME FILE [--keep-running] [--json]\n\n"
			       "Pause VM NAME, write its memory and state to FILE (the stream format,\n"
			       "vmig-stream(5)) and stop it; 'vmig restore FILE' brings it back.\n\n"
			       "  -k, --keep-running   resume the VM after saving instead of stopping it\n"
			       "  -j, --json           print one JSON object with the result\n");
			return VMIG_EXIT_OK;
		default:
			return cli_usage_error("save", "unknown option '%s'", argv[optind - 1]);
		}
	}
	if (argc - optind != 2)
		return cli_usage_error("save", argc - optind < 2 ? "need NAME and FILE" :
				       "too many arguments");
	/* The VMM has its own working directory: give it an absolute path. */
	snprintf(dir, sizeof(dir), "%s", argv[optind + 1]);
	d = dirname(dir);
	{
		char real[PATH_MAX], base[PATH_MAX];

		if (!realpath(d, real)) {
			cli_error("cannot save to %s: %s: %s", argv[optind + 1], d, strerror(errno));
			return VMIG_EXIT_ERROR;
		}
		snprintf(base, sizeof(base), "%s", argv[optind + 1]);
		b = basename(base);
		snprintf(full, sizeof(full), "%s/%s", real, b);
	}
	req = vmig_ctl_request("save");
	json_object_object_add(req, "path", json_object_new_string(full));
	json_object_object_add(req, "keep_running", json_object_new_boolean(keep));
	return follow(argv[optind], req, json, "save", !keep);
}

int cmd_cancel(int argc, char **argv)
{
	struct json_object *reply;

	if (argc == 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
		printf("Usage: vmig cancel NAME\n\nCancel VM NAME's migration or save; "
		       "before the handoff commits, the VM keeps running here.\n");
		return VMIG_EXIT_OK;
	}
	if (argc != 2)
		return cli_usage_error("cancel", argc < 2 ? "missing VM NAME" : "too many arguments");
	if (argv[1][0] == '-')
		return cli_usage_error("cancel", "unknown option '%s'", argv[1]);
	if (cli_vm_call(argv[1], "cancel", &reply) < 0)
		return VMIG_EXIT_ERROR;
	json_object_put(reply);
	printf("cancel requested for VM '%s'\n", argv[1]);
	return VMIG_EXIT_OK;
}
