/*
 * The serial console, both ways.
 *
 * VMM side (cli_console_start): a thread serves RUN_DIR/NAME.console, a
 * unix stream socket.  One client at a time is attached: what it sends is
 * typed into the guest's UART, and the guest's output is copied to it (the
 * console log or standard output gets it as before).  A second client is
 * told the console is busy and closed.  In the foreground, standard input
 * is typed into the guest too.  The thread holds the VM under c->lock so
 * the VMM can swap it for a fresh one when the guest reboots.
 *
 * Client side (vmig console NAME): connects, puts the terminal in raw
 * mode, and copies both ways until Ctrl-] (like virsh console) or until
 * the VM goes away.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <termios.h>
#include <unistd.h>

#include "vmig/util.h"
#include "vmig/vm.h"
#include "cli.h"

#define DETACH_KEY 0x1d     /* Ctrl-] */

struct cli_console {
	pthread_mutex_t lock;
	struct vmig_vm *vm;          /* under lock; NULL while rebooting */
	int listen_fd;
	int client_fd;               /* written by the thread under lock */
	int stdin_fd;                /* -1: none */
	int stop_fd;                 /* eventfd */
	pthread_t thread;
	char path[108];
};

static int listen_unix(const char *path, int *out)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd, ret;

	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -errno;
	unlink(path);
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 4) < 0) {
		ret = -errno;
		close(fd);
		return ret;
	}
	*out = fd;
	return 0;
}

/* Type @len bytes into the guest, waiting while its UART buffer is full. */
static void type_into(struct cli_console *c, const uint8_t *buf, size_t len)
{
	unsigned int tries = 0;
	size_t n;

	while (len && tries < 1000) {
		pthread_mutex_lock(&c->lock);
		n = c->vm ? vmig_vm_console_input(c->vm, buf, len) : len;
		pthread_mutex_unlock(&c->lock);
		buf += n;
		len -= n;
		if (len) {
			usleep(10000);
			tries++;
		}
	}
}

static void attach_client(struct cli_console *c, int fd)
{
	pthread_mutex_lock(&c->lock);
	c->client_fd = fd;
	if (c->vm)
		vmig_vm_console_tap(c->vm, fd);
	pthread_mutex_unlock(&c->lock);
}

static void drop_client(struct cli_console *c)
{
	pthread_mutex_lock(&c->lock);
	if (c->vm)
		vmig_vm_console_tap(c->vm, -1);
	close(c->client_fd);
	c->client_fd = -1;
	pthread_mutex_unlock(&c->lock);
}

static void *console_thread(void *arg)
{
	struct cli_console *c = arg;
	uint8_t buf[4096];
	ssize_t n;

	for (;;) {
		struct pollfd p[4] = {
			{ .fd = c->stop_fd, .events = POLLIN },
			{ .fd = c->listen_fd, .events = POLLIN },
			{ .fd = c->client_fd, .events = POLLIN },
			{ .fd = c->stdin_fd, .events = POLLIN },
		};

		if (poll(p, 4, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (p[0].revents)
			break;
		if (p[1].revents) {
			int fd = accept4(c->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);

			if (fd >= 0 && c->client_fd >= 0) {
				static const char busy[] = "vmig: the console is in use by "
							   "another client\r\n";

				if (write(fd, busy, sizeof(busy) - 1) < 0)
					vmig_log(VMIG_LOG_DEBUG, "console: %s", strerror(errno));
				close(fd);
			} else if (fd >= 0) {
				attach_client(c, fd);
			}
		}
		if (p[2].revents) {
			n = read(c->client_fd, buf, sizeof(buf));
			if (n > 0)
				type_into(c, buf, (size_t)n);
			else if (n == 0 || (errno != EAGAIN && errno != EINTR))
				drop_client(c);
		}
		if (p[3].revents) {
			n = read(c->stdin_fd, buf, sizeof(buf));
			if (n > 0)
				type_into(c, buf, (size_t)n);
			else if (n == 0 || (errno != EAGAIN && errno != EINTR))
				c->stdin_fd = -1;     /* end of input: stop reading it */
		}
	}
	if (c->client_fd >= 0)
		drop_client(c);
	return NULL;
}

int cli_console_start(struct vmig_vm *vm, const char *path, bool use_stdin,
		      struct cli_console **out)
{
	struct cli_console *c;
	int ret;

	*out = NULL;
	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	if (strlen(path) >= sizeof(c->path)) {
		free(c);
		return -ENAMETOOLONG;
	}
	strcpy(c->path, path);
	pthread_mutex_init(&c->lock, NULL);
	c->vm = vm;
	c->client_fd = -1;
	c->stdin_fd = use_stdin ? STDIN_FILENO : -1;
	c->stop_fd = eventfd(0, EFD_CLOEXEC);
	if (c->stop_fd < 0) {
		ret = -errno;
		goto fail_free;
	}
	ret = listen_unix(path, &c->listen_fd);
	if (ret)
		goto fail_event;
	ret = -pthread_create(&c->thread, NULL, console_thread, c);
	if (ret)
		goto fail_listen;
	*out = c;
	return 0;
fail_listen:
	close(c->listen_fd);
	unlink(path);
fail_event:
	close(c->stop_fd);
fail_free:
	pthread_mutex_destroy(&c->lock);
	free(c);
	return ret;
}

void cli_console_set_vm(struct cli_console *c, struct vmig_vm *vm)
{
	if (!c)
		return;
	pthread_mutex_lock(&c->lock);
	if (c->vm)
		vmig_vm_console_tap(c->vm, -1);
	c->vm = vm;
	if (vm && c->client_fd >= 0)
		vmig_vm_console_tap(vm, c->client_fd);
	pthread_mutex_unlock(&c->lock);
}

void cli_console_stop(struct cli_console *c)
{
	uint64_t one = 1;

	if (!c)
		return;
	if (write(c->stop_fd, &one, sizeof(one)) != sizeof(one))
		vmig_log(VMIG_LOG_WARN, "console: cannot stop its thread: %s", strerror(errno));
	pthread_join(c->thread, NULL);
	close(c->listen_fd);
	unlink(c->path);
	close(c->stop_fd);
	pthread_mutex_destroy(&c->lock);
	free(c);
}

/* ---- vmig console NAME ---- */

static void console_usage(FILE *f)
{
	fprintf(f, "Usage: vmig console NAME\n\n"
		"Attach this terminal to the serial console of running VM NAME:\n"
		"what you type goes to the guest, what it prints comes here.\n"
		"Ctrl-] detaches (the VM keeps running).\n\n"
		"  -h, --help   show this help\n");
}

static int connect_console(const char *path, int *out)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd, ret;

	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		ret = -errno;
		close(fd);
		return ret;
	}
	*out = fd;
	return 0;
}

static bool write_full(int fd, const uint8_t *buf, size_t len)
{
	ssize_t n;

	while (len) {
		n = write(fd, buf, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return false;
		buf += n;
		len -= (size_t)n;
	}
	return true;
}

int cmd_console(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct termios saved, raw;
	bool tty, detached = false, in_open = true;
	char path[4096];
	uint8_t buf[4096];
	int c, fd = -1, ret;
	ssize_t n;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
		if (c == 'h') {
			console_usage(stdout);
			return VMIG_EXIT_OK;
		}
		return cli_usage_error("console", "unknown option '%s'", argv[optind - 1]);
	}
	if (optind != argc - 1)
		return cli_usage_error("console", optind >= argc ? "missing VM NAME" :
				       "too many arguments");
	if (cli_vm_path(argv[optind], "console", path, sizeof(path)) < 0)
		return VMIG_EXIT_ERROR;
	ret = connect_console(path, &fd);
	if (ret) {
		if (ret == -ENOENT || ret == -ECONNREFUSED)
			cli_error("VM '%s' has no console here (is it running? nothing answers "
				  "at %s)", argv[optind], path);
		else
			cli_error("cannot connect to %s: %s", path, strerror(-ret));
		return VMIG_EXIT_ERROR;
	}
	tty = isatty(STDIN_FILENO) && tcgetattr(STDIN_FILENO, &saved) == 0;
	if (tty) {
		raw = saved;
		cfmakeraw(&raw);
		tcsetattr(STDIN_FILENO, TCSANOW, &raw);
		fprintf(stderr, "Connected to VM '%s'; Ctrl-] detaches.\r\n", argv[optind]);
	}
	for (;;) {
		struct pollfd p[2] = {
			{ .fd = fd, .events = POLLIN },
			{ .fd = in_open ? STDIN_FILENO : -1, .events = POLLIN },
		};

		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (p[0].revents) {
			n = read(fd, buf, sizeof(buf));
			if (n <= 0)
				break;                   /* the VM went away */
			if (!write_full(STDOUT_FILENO, buf, (size_t)n))
				break;
		}
		if (p[1].revents) {
			uint8_t *key;

			n = read(STDIN_FILENO, buf, sizeof(buf));
			if (n <= 0) {
				/* End of input: keep showing output until the VM goes. */
				in_open = false;
				continue;
			}
			key = tty ? memchr(buf, DETACH_KEY, (size_t)n) : NULL;
			if (key)
				n = key - buf;
			if (n > 0 && !write_full(fd, buf, (size_t)n))
				break;
			if (key) {
				detached = true;
				break;
			}
		}
	}
	if (tty) {
		tcsetattr(STDIN_FILENO, TCSANOW, &saved);
		fprintf(stderr, "\n%s\n", detached ? "Detached from the console." :
			"The console closed (the VM stopped or moved).");
	}
	close(fd);
	return VMIG_EXIT_OK;
}
