/*
 * vmig run: this process becomes the VM's VMM.
 *
 * Order of set-up, each step undone on failure: the run directory; the
 * VM's lock file (NAME.pid, flock: exactly one VMM per name); with
 * --detach a fork, the child carrying on in a new session with its console
 * in NAME.log and telling the parent through a pipe when its control
 * socket is up (or why it failed); the VM; the control socket (NAME.sock);
 * the vCPUs.  Teardown reverses it, so a stopped VM leaves only its
 * console log behind.
 *
 * Signals: SIGINT, SIGTERM and SIGHUP are blocked in every thread and read
 * from a signalfd by the control loop, which stops the VM cleanly.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "vmig/util.h"
#include "vmig/vm.h"
#include "cli.h"

#define DEFAULT_MEMORY (256ull << 20)
#define DEFAULT_CMDLINE "console=ttyS0"

struct run_opts {
	const char *name;
	uint64_t memory;
	unsigned int vcpus;
	const char *workload;
	const char *kernel;
	const char *initrd;
	const char *cmdline;
	bool detach;
};


static void run_usage(FILE *f)
{
	fprintf(f, "Usage: vmig run NAME [--memory SIZE] [--vcpus N] [--workload SPEC] [--detach]\n"
		"       vmig run NAME --kernel IMAGE [--initrd FILE] [--cmdline STRING] [...]\n\n"
		"Start VM NAME in this process (its VMM) with the built-in test guest,\n"
		"or with a Linux kernel.\n\n"
		"  -m, --memory SIZE     guest RAM, e.g. 512M, 4G (default 256M)\n"
		"  -c, --vcpus N         number of vCPUs, 1-%u (default 1)\n"
		"  -w, --workload SPEC   test guest workload: rate=PAGES_PER_S|max,wss=SIZE,gens=N,\n"
		"                        fill=stamp|random|text,idle_after=N,quiet\n"
		"                        (default rate=2000,wss=4M per vCPU, fill=stamp, forever)\n"
		"  -k, --kernel IMAGE    boot this Linux kernel (bzImage or ELF vmlinux, x86-64)\n"
		"  -i, --initrd FILE     with this initrd or initramfs\n"
		"  -a, --cmdline STRING  kernel command line (default \"" DEFAULT_CMDLINE "\")\n"
		"  -d, --detach          run in the background once the control socket is up;\n"
		"                        the console goes to RUN_DIR/NAME.log\n"
		"  -h, --help            show this help\n\n"
		"In the foreground the guest console is on standard output and standard input\n"
		"is typed into it; Ctrl-C stops the VM.  'vmig console NAME' attaches a\n"
		"terminal to it from elsewhere.  A guest reboot restarts a --kernel VM.\n",
		VMIG_VM_MAX_VCPUS);
}

static int parse_run(int argc, char **argv, struct run_opts *o)
{
	static const struct option longopts[] = {
		{ "memory",   required_argument, NULL, 'm' },
		{ "vcpus",    required_argument, NULL, 'c' },
		{ "workload", required_argument, NULL, 'w' },
		{ "detach",   no_argument,       NULL, 'd' },
		{ "kernel",   required_argument, NULL, 'k' },
		{ "initrd",   required_argument, NULL, 'i' },
		{ "cmdline",  required_argument, NULL, 'a' },
		{ "help",     no_argument,       NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	char *end;
	unsigned long v;
	int c;

	memset(o, 0, sizeof(*o));
	o->memory = DEFAULT_MEMORY;
	o->vcpus = 1;
	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":m:c:w:dk:i:a:h", longopts, NULL)) != -1) {
		switch (c) {
		case 'm':
			if (vmig_size_parse(optarg, &o->memory) < 0)
				return cli_usage_error("run", "bad --memory '%s': give a size "
						       "such as 512M or 4G", optarg);
			break;
		case 'c':
			errno = 0;
			v = strtoul(optarg, &end, 10);
			if (errno || *end || !*optarg || *optarg == '-' || v < 1 ||
			    v > VMIG_VM_MAX_VCPUS)
				return cli_usage_error("run", "bad --vcpus '%s': give a number "
						       "from 1 to %u", optarg, VMIG_VM_MAX_VCPUS);
			o->vcpus = (unsigned int)v;
			break;
		case 'w':
			o->workload = optarg;
			break;
		case 'd':
			o->detach = true;
			break;
		case 'k':
			o->kernel = optarg;
			break;
		case 'i':
			o->initrd = optarg;
			break;
		case 'a':
			o->cmdline = optarg;
			break;
		case 'h':
			run_usage(stdout);
			exit(VMIG_EXIT_OK);
		case ':':
			return cli_usage_error("run", "option '%s' needs a value", argv[optind - 1]);
		default:
			return cli_usage_error("run", "unknown option '%s'", argv[optind - 1]);
		}
	}
	if (optind != argc - 1)
		return cli_usage_error("run", optind >= argc ? "missing VM NAME" :
				       "too many arguments");
	o->name = argv[optind];
	if (o->kernel && o->workload)
		return cli_usage_error("run", "--workload is for the built-in guest; "
				       "a --kernel VM runs what its kernel runs");
	if (!o->kernel && (o->initrd || o->cmdline))
		return cli_usage_error("run", "--initrd and --cmdline need a --kernel");
	if (o->kernel && !o->cmdline)
		o->cmdline = DEFAULT_CMDLINE;
	if (vmig_vm_name_valid(o->name) < 0) {
		cli_error("bad VM name '%s': use 1-64 letters, digits, '.', '_' or '-', "
			  "not starting with '.' or '-'", o->name);
		return VMIG_EXIT_ERROR;
	}
	return 0;
}

int cli_make_paths(const char *name, struct cli_paths *p)
{
	int ret;

	ret = vmig_rundir_get(p->dir, sizeof(p->dir));
	if (ret < 0) {
		cli_error("no run directory: set VMIG_RUN_DIR or XDG_RUNTIME_DIR");
		return ret;
	}
	ret = vmig_rundir_ensure(p->dir);
	if (ret < 0) {
		cli_error("cannot create the run directory %s: %s", p->dir, strerror(-ret));
		return ret;
	}
	if (vmig_rundir_path(p->dir, name, "pid", p->pid, sizeof(p->pid)) < 0 ||
	    vmig_rundir_path(p->dir, name, "sock", p->sock, sizeof(p->sock)) < 0 ||
	    vmig_rundir_path(p->dir, name, "log", p->log, sizeof(p->log)) < 0 ||
	    vmig_rundir_path(p->dir, name, "console", p->console, sizeof(p->console)) < 0) {
		cli_error("run directory path too long: %s", p->dir);
		return -ENAMETOOLONG;
	}
	return 0;
}

/* Take NAME.pid's lock: one VMM per name.  Returns the fd or -errno. */
int cli_lock_name(const char *name, const char *path)
{
	char buf[32] = "";
	ssize_t n;
	int fd;

	fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0) {
		cli_error("cannot open %s: %s", path, strerror(errno));
		return -errno;
	}
	if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		int ret = -errno;

		if (ret == -EWOULDBLOCK) {
			n = pread(fd, buf, sizeof(buf) - 1, 0);
			buf[n > 0 ? n : 0] = 0;
			buf[strcspn(buf, "\n")] = 0;
			cli_error("VM '%s' is already running%s%s%s", name,
				  buf[0] ? " (pid " : "", buf, buf[0] ? ")" : "");
			ret = -EEXIST;
		} else {
			cli_error("cannot lock %s: %s", path, strerror(-ret));
		}
		close(fd);
		return ret;
	}
	return fd;
}

void cli_write_pid(int fd)
{
	char buf[32];
	int len = snprintf(buf, sizeof(buf), "%d\n", (int)getpid());

	if (ftruncate(fd, 0) < 0 || pwrite(fd, buf, len, 0) != len)
		vmig_log(VMIG_LOG_WARN, "cannot write the pid file: %s", strerror(errno));
}

/* Tell a waiting parent how set-up went: "" for success, else a message. */
void cli_notify_parent(int fd, const char *msg)
{
	if (fd < 0)
		return;
	if (write(fd, msg, strlen(msg) + 1) < 0)
		vmig_log(VMIG_LOG_WARN, "cannot notify the parent: %s", strerror(errno));
	close(fd);
}

/* Parent side of --detach: wait until the child's socket is up. */
static int wait_for_child(pid_t child, int fd, const struct run_opts *o,
			  const struct cli_paths *p)
{
	char msg[1024];
	size_t len = 0;
	ssize_t n;
	int status;

	while (len < sizeof(msg) - 1) {
		n = read(fd, msg + len, sizeof(msg) - 1 - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += n;
		if (memchr(msg, 0, len))
			break;
	}
	close(fd);
	msg[len] = 0;
	if (len == 0) {
		if (waitpid(child, &status, 0) == child && WIFSIGNALED(status))
			cli_error("the VMM process for '%s' died of signal %d during start-up "
				  "(see %s)", o->name, WTERMSIG(status), p->log);
		else
			cli_error("the VMM process for '%s' exited during start-up (see %s)",
				  o->name, p->log);
		return VMIG_EXIT_ERROR;
	}
	if (msg[0]) {
		cli_error("%s", msg);
		waitpid(child, &status, 0);
		return VMIG_EXIT_ERROR;
	}
	printf("VM '%s' is running (pid %d); control socket %s; console log %s\n",
	       o->name, (int)child, p->sock, p->log);
	return VMIG_EXIT_OK;
}

int cli_block_signals(void)
{
	sigset_t set;
	int fd;

	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGHUP);
	/* Blocked here, so every thread created later inherits it blocked. */
	if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0)
		return -EINVAL;
	fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
	return fd < 0 ? -errno : fd;
}

/* Be the VMM.  @notify_fd is the pipe to a --detach parent, or -1. */
static int vmm_main(const struct run_opts *o, const struct cli_paths *p, int notify_fd)
{
	struct vmig_vm_config cfg = {
		.name = o->name,
		.mem_size = o->memory,
		.nr_vcpus = o->vcpus,
		.workload = o->workload,
		.console_fd = STDOUT_FILENO,
		.kernel = o->kernel,
		.initrd = o->initrd,
		.cmdline = o->cmdline,
	};
	struct vmig_err err = { 0 };
	struct vmig_vm *vm = NULL;
	struct cli_console *console = NULL;
	int sig_fd, listen_fd = -1, ret, code = VMIG_EXIT_ERROR;
	char msg[4096 + 512];

	sig_fd = cli_block_signals();
	if (sig_fd < 0) {
		snprintf(msg, sizeof(msg), "cannot set up signal handling: %s", strerror(-sig_fd));
		goto fail_msg;
	}
	ret = vmig_vm_create(&cfg, &vm, &err);
	if (ret) {
		snprintf(msg, sizeof(msg), "%s", err.msg[0] ? err.msg : strerror(-ret));
		goto fail_msg;
	}
	ret = vmig_ctl_listen(p->sock, &listen_fd);
	if (ret) {
		snprintf(msg, sizeof(msg), "cannot listen on %s: %s", p->sock, strerror(-ret));
		goto fail_msg;
	}
	ret = cli_console_start(vm, p->console, notify_fd < 0, &console);
	if (ret) {
		snprintf(msg, sizeof(msg), "cannot listen on %s: %s", p->console, strerror(-ret));
		goto fail_msg;
	}
	ret = vmig_vm_start(vm, &err);
	if (ret) {
		snprintf(msg, sizeof(msg), "%s", err.msg);
		goto fail_msg;
	}
	if (notify_fd >= 0) {
		cli_notify_parent(notify_fd, "");
		notify_fd = -1;
	} else {
		char sz[32];

		vmig_size_format(o->memory, sz, sizeof(sz));
		fprintf(stderr, "vmig: VM '%s' running: %u vCPU%s, %s; control socket %s; "
			"Ctrl-C stops it\n", o->name, o->vcpus, o->vcpus > 1 ? "s" : "", sz, p->sock);
	}
	code = cli_control_serve(vm, listen_fd, sig_fd);
	/* A --kernel guest that reset itself boots again in a fresh VM. */
	while (vmig_vm_reboot_requested(vm) && vmig_vm_can_reboot(vm)) {
		cli_console_set_vm(console, NULL);
		err = (struct vmig_err){ 0 };
		ret = vmig_vm_recreate(&vm, &err);
		if (!ret)
			ret = vmig_vm_start(vm, &err);
		if (ret) {
			cli_error("cannot restart VM '%s' after its reboot: %s", o->name,
				  err.msg[0] ? err.msg : strerror(-ret));
			code = VMIG_EXIT_ERROR;
			break;
		}
		cli_console_set_vm(console, vm);
		fprintf(stderr, "vmig: VM '%s' restarted\n", o->name);
		code = cli_control_serve(vm, listen_fd, sig_fd);
	}
	goto out;

fail_msg:
	if (notify_fd >= 0)
		cli_notify_parent(notify_fd, msg);
	else
		cli_error("%s", msg);
	/* A detached child's log gets it too. */
	if (o->detach)
		fprintf(stderr, "vmig: %s\n", msg);
out:
	cli_console_stop(console);
	if (listen_fd >= 0) {
		unlink(p->sock);
		close(listen_fd);
	}
	vmig_vm_destroy(vm);
	if (sig_fd >= 0)
		close(sig_fd);
	return code;
}

int cmd_run(int argc, char **argv)
{
	struct run_opts o;
	struct cli_paths p;
	int ret, lock_fd, pipefd[2], code;
	pid_t child;

	ret = parse_run(argc, argv, &o);
	if (ret)
		return ret;
	{
		char why[512];

		if (cli_drain_check(why, sizeof(why)) < 0) {
			cli_error("cannot start VM '%s': %s", o.name, why);
			return VMIG_EXIT_ERROR;
		}
	}
	if (cli_make_paths(o.name, &p) < 0)
		return VMIG_EXIT_ERROR;
	lock_fd = cli_lock_name(o.name, p.pid);
	if (lock_fd < 0)
		return VMIG_EXIT_ERROR;

	if (!o.detach) {
		cli_write_pid(lock_fd);
		code = vmm_main(&o, &p, -1);
		unlink(p.pid);
		close(lock_fd);
		return code;
	}

	if (pipe2(pipefd, O_CLOEXEC) < 0) {
		cli_error("pipe: %s", strerror(errno));
		close(lock_fd);
		return VMIG_EXIT_ERROR;
	}
	fflush(NULL);
	child = fork();
	if (child < 0) {
		cli_error("fork: %s", strerror(errno));
		close(lock_fd);
		return VMIG_EXIT_ERROR;
	}
	if (child > 0) {
		/* The child shares the lock's open file and keeps it locked. */
		close(pipefd[1]);
		close(lock_fd);
		return wait_for_child(child, pipefd[0], &o, &p);
	}

	close(pipefd[0]);
	setsid();
	{
		int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
		int log_fd = open(p.log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);

		if (null_fd < 0 || log_fd < 0) {
			char msg[4096 + 512];

			snprintf(msg, sizeof(msg), "cannot open the console log %s: %s",
				 p.log, strerror(errno));
			cli_notify_parent(pipefd[1], msg);
			_exit(VMIG_EXIT_ERROR);
		}
		dup2(null_fd, STDIN_FILENO);
		dup2(log_fd, STDOUT_FILENO);
		dup2(log_fd, STDERR_FILENO);
		close(null_fd);
		close(log_fd);
	}
	cli_write_pid(lock_fd);
	code = vmm_main(&o, &p, pipefd[1]);
	unlink(p.pid);
	close(lock_fd);
	_exit(code);
}
