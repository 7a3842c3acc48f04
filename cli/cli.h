/* The vmig command line: subcommands and what they share. */
#ifndef VMIG_CLI_H
#define VMIG_CLI_H

#include <stdbool.h>
#include <stdio.h>
#include <stdint.h>

#include "vmig/util.h"

struct vmig_vm;
struct json_object;

/* Exit codes of every command. */
#define VMIG_EXIT_OK     0
#define VMIG_EXIT_ERROR  1
#define VMIG_EXIT_USAGE  2

struct cli_paths {
	char dir[4096];
	char pid[4096];
	char sock[4096];
	char log[4096];
	char console[4096];
};

/* The run directory (created) and NAME's files in it; errors printed. */
int cli_make_paths(const char *name, struct cli_paths *p);
/* Take NAME.pid's lock (one VMM per name); the fd or -errno, error printed. */
int cli_lock_name(const char *name, const char *path);
void cli_write_pid(int fd);
/* Tell a --detach parent how start-up went: "" for success, else why. */
void cli_notify_parent(int fd, const char *msg);
/* Block SIGINT/SIGTERM/SIGHUP in every thread to come; a signalfd for them. */
int cli_block_signals(void);

int cmd_run(int argc, char **argv);
int cmd_migrate(int argc, char **argv);
int cmd_cancel(int argc, char **argv);
int cmd_save(int argc, char **argv);
int cmd_incoming(int argc, char **argv);
int cmd_restore(int argc, char **argv);
int cmd_list(int argc, char **argv);
int cmd_status(int argc, char **argv);
int cmd_pause(int argc, char **argv);
int cmd_resume(int argc, char **argv);
int cmd_stop(int argc, char **argv);
int cmd_console(int argc, char **argv);
int cmd_shutdown(int argc, char **argv);
int cmd_libvirt_serve(int argc, char **argv);
int cmd_evacuate(int argc, char **argv);
int cmd_host_info(int argc, char **argv);

/*
 * The drain mark (cli/cmd-host-info.c): 0 if this host takes VMs, else
 * -EBUSY with why in @msg ("this host is being drained ...").
 */
int cli_drain_check(char *msg, size_t len);

/*
 * The VMM's console socket (cli/console.c): serve @path for `vmig
 * console`, and type standard input into the guest if @use_stdin.
 * cli_console_set_vm() swaps the VM (NULL while none, e.g. rebooting).
 * Stop accepts NULL.
 */
struct cli_console;
int cli_console_start(struct vmig_vm *vm, const char *path, bool use_stdin,
		      struct cli_console **out);
void cli_console_set_vm(struct cli_console *c, struct vmig_vm *vm);
void cli_console_stop(struct cli_console *c);

/* Print "vmig: <message>" to stderr. */
void cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Print a usage error and a hint at --help; returns VMIG_EXIT_USAGE. */
int cli_usage_error(const char *cmd, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* RUN_DIR/NAME.SUFFIX for a VM, with errors printed; 0 or -errno. */
int cli_vm_path(const char *name, const char *suffix, char *buf, size_t len);

/*
 * Send {"cmd": cmd} to VM @name and return its reply (caller puts it).
 * Prints an error and returns -errno when the VM is not there or refuses.
 */
int cli_vm_call(const char *name, const char *cmd, struct json_object **reply);

/* Wait until VM @name's VMM process has exited (its lock is free). */
int cli_wait_gone(const char *name, int timeout_ms);

/*
 * The VMM side: serve the control socket @listen_fd for @vm until the VM
 * stops (guest power-off, "stop", or a signal on @signal_fd).  Runs on the
 * VMM's main thread.  Returns the process exit code.
 */
int cli_control_serve(struct vmig_vm *vm, int listen_fd, int signal_fd);

/* The status object the control socket returns for @vm. */
struct json_object *cli_vm_status_json(struct vmig_vm *vm);

/* Short names for the JSON lookups used all over (util/ctl.c). */
static inline const char *jstr(struct json_object *o, const char *key, const char *dflt)
{
	return vmig_json_str(o, key, dflt);
}

static inline uint64_t ju64(struct json_object *o, const char *key)
{
	return vmig_json_u64(o, key);
}

#endif
