/*
 * vmig: entry point and subcommand table.
 *
 * Every subcommand is a function taking (argc, argv) from its own name on,
 * parsing its options with getopt_long and returning an exit code:
 * 0 success, 1 failure, 2 bad usage.  Only this layer prints errors.
 */
#include "config.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "vmig/util.h"
#include "cli.h"

struct command {
	const char *name;
	int (*fn)(int argc, char **argv);
	const char *summary;
};

static const struct command commands[] = {
	{ "run",    cmd_run,    "start a VM in its own VMM process" },
	{ "list",   cmd_list,   "list the VMs running on this host" },
	{ "status", cmd_status, "show a VM's state and progress" },
	{ "pause",  cmd_pause,  "pause a VM's vCPUs" },
	{ "resume", cmd_resume, "resume a paused VM" },
	{ "stop",   cmd_stop,   "stop a VM and end its VMM process" },
	{ "shutdown", cmd_shutdown, "ask a VM's guest to power itself off" },
	{ "console", cmd_console, "attach the terminal to a VM's serial console" },
	{ "migrate", cmd_migrate, "live-migrate a VM to another host" },
	{ "incoming", cmd_incoming, "receive a live migration" },
	{ "cancel", cmd_cancel, "cancel a VM's migration or save" },
	{ "save",   cmd_save,   "write a VM to a file and stop it" },
	{ "restore", cmd_restore, "start a VM from a file written by save" },
#ifdef HAVE_LIBVIRT
	{ "libvirt-serve", cmd_libvirt_serve, "serve libvirt's protocol (virsh) for this host's VMs" },
#endif
	{ "evacuate", cmd_evacuate, "live-migrate every VM off this host" },
	{ "host-info", cmd_host_info, "show free memory, CPUs and the drain mark" },
};

void cli_error(const char *fmt, ...)
{
	va_list ap;

	fputs("vmig: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

int cli_usage_error(const char *cmd, const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "vmig %s: ", cmd);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\nTry 'vmig %s --help'.\n", cmd);
	return VMIG_EXIT_USAGE;
}

int cli_vm_path(const char *name, const char *suffix, char *buf, size_t len)
{
	char dir[4096];
	int ret;

	if (vmig_vm_name_valid(name) < 0) {
		cli_error("bad VM name '%s': use 1-64 letters, digits, '.', '_' or '-', "
			  "not starting with '.' or '-'", name);
		return -EINVAL;
	}
	ret = vmig_rundir_get(dir, sizeof(dir));
	if (ret < 0) {
		cli_error("no run directory: set VMIG_RUN_DIR or XDG_RUNTIME_DIR");
		return ret;
	}
	ret = vmig_rundir_path(dir, name, suffix, buf, len);
	if (ret < 0)
		cli_error("run directory path too long: %s", dir);
	return ret;
}

int cli_vm_call(const char *name, const char *cmd, struct json_object **reply)
{
	char path[4096];
	const char *msg = NULL;
	int ret;

	*reply = NULL;
	ret = cli_vm_path(name, "sock", path, sizeof(path));
	if (ret < 0)
		return ret;
	ret = vmig_ctl_call(path, vmig_ctl_request(cmd), reply);
	if (ret == -ENOENT || ret == -ECONNREFUSED) {
		cli_error("no VM named '%s' is running (nothing answers at %s)", name, path);
		return ret;
	}
	if (ret < 0) {
		cli_error("cannot talk to VM '%s' at %s: %s", name, path, strerror(-ret));
		return ret;
	}
	ret = vmig_ctl_reply_status(*reply, &msg);
	if (ret < 0) {
		cli_error("%s: %s", name, msg ? msg : strerror(-ret));
		json_object_put(*reply);
		*reply = NULL;
	}
	return ret;
}

static void usage(FILE *f)
{
	size_t i;

	fprintf(f, "Usage: vmig COMMAND [OPTIONS] [ARGS]\n\n"
		"vmig runs KVM virtual machines and moves them between hosts.\n\n"
		"Commands:\n");
	for (i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		fprintf(f, "  %-14s %s\n", commands[i].name, commands[i].summary);
	fprintf(f, "\nRun 'vmig COMMAND --help' for a command's options; "
		"'man vmig' and 'man vmig-COMMAND' for the manuals.\n"
		"Environment: VMIG_RUN_DIR (run directory), VMIG_LOG (error|warn|info|debug).\n");
}

int main(int argc, char **argv)
{
	const char *lvl = getenv("VMIG_LOG");
	size_t i;

	if (lvl && vmig_log_level_parse(lvl) >= 0)
		vmig_log_set_level(vmig_log_level_parse(lvl));
	if (argc < 2) {
		usage(stderr);
		return VMIG_EXIT_USAGE;
	}
	if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
		usage(stdout);
		return VMIG_EXIT_OK;
	}
	if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "-V")) {
		printf("vmig %s\n", PACKAGE_VERSION);
		return VMIG_EXIT_OK;
	}
	for (i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		if (!strcmp(argv[1], commands[i].name))
			return commands[i].fn(argc - 1, argv + 1);
	cli_error("unknown command '%s'", argv[1]);
	fprintf(stderr, "Try 'vmig --help'.\n");
	return VMIG_EXIT_USAGE;
}
