/*
 * Commands that talk to running VMs over their control sockets:
 * list, status, pause, resume, stop.
 */
#include "config.h"

#include <dirent.h>
#include <inttypes.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "vmig/util.h"
#include "cli.h"

/* Parse "[--json] NAME" or "[--json]" (name_needed false). */
static int parse_simple(const char *cmd, int argc, char **argv, bool json_ok,
			bool name_needed, bool *json, const char **name, const char *usage)
{
	static const struct option longopts[] = {
		{ "json", no_argument, NULL, 'j' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	*json = false;
	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "jh", longopts, NULL)) != -1) {
		switch (c) {
		case 'j':
			if (!json_ok)
				return cli_usage_error(cmd, "unknown option '--json'");
			*json = true;
			break;
		case 'h':
			printf("%s", usage);
			exit(VMIG_EXIT_OK);
		default:
			return cli_usage_error(cmd, "unknown option '%s'", argv[optind - 1]);
		}
	}
	if (name_needed) {
		if (optind != argc - 1)
			return cli_usage_error(cmd, optind >= argc ? "missing VM NAME" :
					       "too many arguments");
		*name = argv[optind];
	} else if (optind != argc) {
		return cli_usage_error(cmd, "too many arguments");
	}
	return 0;
}

static void print_status(struct json_object *st)
{
	char mem[32], up[32];
	struct json_object *g;

	vmig_size_format(ju64(st, "memory"), mem, sizeof(mem));
	vmig_duration_format(ju64(st, "uptime_ms"), up, sizeof(up));
	printf("name:          %s\n", jstr(st, "name", "?"));
	printf("state:         %s\n", jstr(st, "state", "?"));
	printf("pid:           %s\n", jstr(st, "pid", "?"));
	printf("memory:        %s\n", mem);
	printf("vcpus:         %s\n", jstr(st, "vcpus", "?"));
	printf("uptime:        %s\n", up);
	if (json_object_object_get_ex(st, "listen", &g))   /* a waiting vmig incoming */
		printf("listen:        %s\n", json_object_get_string(g));
	if (json_object_object_get_ex(st, "workload", &g))
		printf("workload:      %s\n", json_object_get_string(g));
	if (json_object_object_get_ex(st, "guest", &g)) {
		printf("generation:    %" PRIu64 "\n", ju64(g, "generation"));
		printf("pages_written: %" PRIu64 "\n", ju64(g, "pages_written"));
	}
	if (json_object_object_get_ex(st, "migration", &g)) {
		char sent[32], rem[32], bw[32], total[32];

		vmig_size_format(ju64(g, "transferred_bytes"), sent, sizeof(sent));
		vmig_size_format(ju64(g, "remaining_bytes"), rem, sizeof(rem));
		vmig_size_format(ju64(g, "bandwidth_bps"), bw, sizeof(bw));
		vmig_duration_format(ju64(g, "total_time_ms"), total, sizeof(total));
		printf("migration:     %s after %s, iteration %" PRIu64 ", sent %s, "
		       "remaining %s, %s/s, dirty %" PRIu64 " pages/s, expected downtime %"
		       PRIu64 " ms\n", jstr(g, "status", "?"), total, ju64(g, "iteration"),
		       sent, rem, bw, ju64(g, "dirty_rate_pps"), ju64(g, "expected_downtime_ms"));
		if (json_object_object_get_ex(g, "error", NULL))
			printf("               %s\n", jstr(g, "error", ""));
	}
	if (!strcmp(jstr(st, "state", ""), "handoff-uncertain"))
		printf("\nThe migration's handoff is uncertain: the destination may be running "
		       "this VM.\nCheck with 'vmig status %s' on the destination.  If it runs "
		       "there, 'vmig stop %s' here;\nif it does not, 'vmig resume --force %s' "
		       "here.\n", jstr(st, "name", "NAME"), jstr(st, "name", "NAME"),
		       jstr(st, "name", "NAME"));
}

int cmd_status(int argc, char **argv)
{
	struct json_object *reply;
	const char *name = NULL;
	bool json;
	int ret;

	ret = parse_simple("status", argc, argv, true, true, &json, &name,
			   "Usage: vmig status NAME [--json]\n\n"
			   "Show VM NAME's state, size, uptime and the test guest's progress.\n"
			   "  -j, --json   print one JSON object\n");
	if (ret)
		return ret;
	if (cli_vm_call(name, "status", &reply) < 0)
		return VMIG_EXIT_ERROR;
	if (json) {
		json_object_object_del(reply, "ok");
		printf("%s\n", json_object_to_json_string_ext(reply, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
	} else {
		print_status(reply);
	}
	json_object_put(reply);
	return VMIG_EXIT_OK;
}

static int simple_cmd(const char *cmd, int argc, char **argv, const char *usage,
		      const char *done)
{
	struct json_object *reply;
	const char *name = NULL;
	bool json;
	int ret;

	ret = parse_simple(cmd, argc, argv, false, true, &json, &name, usage);
	if (ret)
		return ret;
	if (cli_vm_call(name, cmd, &reply) < 0)
		return VMIG_EXIT_ERROR;
	json_object_put(reply);
	if (done)
		printf("VM '%s' %s\n", name, done);
	return VMIG_EXIT_OK;
}

int cmd_pause(int argc, char **argv)
{
	return simple_cmd("pause", argc, argv, "Usage: vmig pause NAME\n\n"
			  "Pause VM NAME's vCPUs; returns once none runs guest code.\n",
			  "paused");
}

int cmd_resume(int argc, char **argv)
{
	struct json_object *reply = NULL, *req;
	char path[4096];
	const char *msg = NULL;
	int ret;

	if (argc != 3 || (strcmp(argv[1], "--force") && strcmp(argv[2], "--force")))
		return simple_cmd("resume", argc, argv, "Usage: vmig resume NAME [--force]\n\n"
				  "Resume a paused VM NAME.  --force resumes a VM whose "
				  "migration handoff is uncertain:\nonly when you have checked "
				  "that the destination does not run it.\n", "resumed");
	/* resume --force NAME: resolve a handoff-uncertain VM. */
	if (cli_vm_path(!strcmp(argv[1], "--force") ? argv[2] : argv[1], "sock",
			path, sizeof(path)) < 0)
		return VMIG_EXIT_ERROR;
	req = vmig_ctl_request("resume");
	json_object_object_add(req, "force", json_object_new_boolean(1));
	ret = vmig_ctl_call(path, req, &reply);
	if (ret == 0)
		ret = vmig_ctl_reply_status(reply, &msg);
	if (ret < 0) {
		cli_error("%s", msg ? msg : strerror(-ret));
		json_object_put(reply);
		return VMIG_EXIT_ERROR;
	}
	json_object_put(reply);
	printf("VM '%s' resumed\n", !strcmp(argv[1], "--force") ? argv[2] : argv[1]);
	return VMIG_EXIT_OK;
}

/* Wait until the VMM releases NAME.pid's lock, i.e. has finished. */
int cli_wait_gone(const char *name, int timeout_ms)
{
	char dir[4096];

	if (vmig_vm_name_valid(name) < 0 || vmig_rundir_get(dir, sizeof(dir)) < 0)
		return -EINVAL;
	return vmig_rundir_wait_gone(dir, name, timeout_ms);
}

int cmd_stop(int argc, char **argv)
{
	struct json_object *reply;
	const char *name = NULL;
	bool json;
	int ret;

	ret = parse_simple("stop", argc, argv, false, true, &json, &name,
			   "Usage: vmig stop NAME\n\n"
			   "Stop VM NAME and wait until its VMM process has exited.\n");
	if (ret)
		return ret;
	if (cli_vm_call(name, "stop", &reply) < 0)
		return VMIG_EXIT_ERROR;
	json_object_put(reply);
	ret = cli_wait_gone(name, 30000);
	if (ret == -ETIMEDOUT) {
		cli_error("VM '%s' was asked to stop but its VMM process is still there "
			  "after 30 s", name);
		return VMIG_EXIT_ERROR;
	}
	printf("VM '%s' stopped\n", name);
	return VMIG_EXIT_OK;
}

int cmd_shutdown(int argc, char **argv)
{
	struct json_object *reply;
	const char *name = NULL;
	bool json;
	int ret;

	ret = parse_simple("shutdown", argc, argv, false, true, &json, &name,
			   "Usage: vmig shutdown NAME\n\n"
			   "Ask VM NAME's guest to power itself off, and wait (60 s at most) until\n"
			   "it has and its VMM process has exited.  A Linux guest gets a press of\n"
			   "its ACPI power button; one without it (acpi=off) cannot be asked: use\n"
			   "vmig stop.\n");
	if (ret)
		return ret;
	if (cli_vm_call(name, "shutdown", &reply) < 0)
		return VMIG_EXIT_ERROR;
	json_object_put(reply);
	ret = cli_wait_gone(name, 60000);
	if (ret == -ETIMEDOUT) {
		cli_error("VM '%s' was asked to shut down but still runs after 60 s "
			  "(vmig stop %s ends it)", name, name);
		return VMIG_EXIT_ERROR;
	}
	printf("VM '%s' shut down\n", name);
	return VMIG_EXIT_OK;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

int cmd_list(int argc, char **argv)
{
	struct json_object *arr = NULL;
	char dir[4096], path[8192], **names = NULL;
	const char *unused;
	size_t n = 0, cap = 0, i;
	struct dirent *de;
	bool json;
	DIR *d;
	int ret;

	ret = parse_simple("list", argc, argv, true, false, &json, &unused,
			   "Usage: vmig list [--json]\n\n"
			   "List the VMs running on this host (in the run directory).\n"
			   "  -j, --json   print a JSON array\n");
	if (ret)
		return ret;
	if (vmig_rundir_get(dir, sizeof(dir)) < 0) {
		cli_error("no run directory: set VMIG_RUN_DIR or XDG_RUNTIME_DIR");
		return VMIG_EXIT_ERROR;
	}
	d = opendir(dir);
	if (d) {
		while ((de = readdir(d))) {
			size_t len = strlen(de->d_name);

			if (len < 6 || strcmp(de->d_name + len - 5, ".sock"))
				continue;
			if (n == cap) {
				char **nn = realloc(names, (cap = cap ? cap * 2 : 16) * sizeof(*nn));

				if (!nn)
					break;
				names = nn;
			}
			names[n] = strndup(de->d_name, len - 5);
			if (names[n])
				n++;
		}
		closedir(d);
	} else if (errno != ENOENT) {
		cli_error("cannot read the run directory %s: %s", dir, strerror(errno));
		return VMIG_EXIT_ERROR;
	}
	qsort(names, n, sizeof(*names), cmp_str);

	if (json)
		arr = json_object_new_array();
	else
		printf("%-20s %-17s %7s %5s %10s %10s\n", "NAME", "STATE", "PID", "VCPUS", "MEMORY",
		       "UPTIME");
	for (i = 0; i < n; i++) {
		struct json_object *reply = NULL;

		snprintf(path, sizeof(path), "%s/%s.sock", dir, names[i]);
		if (vmig_ctl_call(path, vmig_ctl_request("status"), &reply) < 0 ||
		    vmig_ctl_reply_status(reply, NULL) < 0) {
			json_object_put(reply);
			continue;   /* stale socket of a VMM that died */
		}
		if (json) {
			json_object_object_del(reply, "ok");
			json_object_array_add(arr, reply);
			continue;
		}
		{
			char mem[32], up[32];

			vmig_size_format(ju64(reply, "memory"), mem, sizeof(mem));
			vmig_duration_format(ju64(reply, "uptime_ms"), up, sizeof(up));
			printf("%-20s %-17s %7s %5s %10s %10s\n", jstr(reply, "name", names[i]),
			       jstr(reply, "state", "?"), jstr(reply, "pid", "?"),
			       jstr(reply, "vcpus", "?"), mem, up);
		}
		json_object_put(reply);
	}
	if (json) {
		printf("%s\n", json_object_to_json_string_ext(arr, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
		json_object_put(arr);
	}
	for (i = 0; i < n; i++)
		free(names[i]);
	free(names);
	return VMIG_EXIT_OK;
}
