/*
 * The VMM's control loop: the control socket, signals and VM events.
 *
 * Runs on the VMM process's main thread with poll(); clients connect to
 * RUN_DIR/NAME.sock and send one JSON request per line; each gets one
 * reply line.  Requests are handled to completion before the next one
 * (pause returns once every vCPU has left KVM_RUN), so replies never
 * interleave.  A client that sends garbage gets an error reply; one that
 * overflows the line limit is disconnected.  Neither affects the VM.
 */
#include "config.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <json-c/json.h>

#include "vmig/util.h"
#include "vmig/vm.h"
#include "cli.h"

#define MAX_CLIENTS 16

struct client {
	int fd;
	struct vmig_ctl_reader reader;
};

struct server {
	struct vmig_vm *vm;
	int listen_fd;
	int signal_fd;
	struct client clients[MAX_CLIENTS];
	unsigned int nr_clients;
	bool quit;
	int exit_code;
};

struct json_object *cli_vm_status_json(struct vmig_vm *vm)
{
	const struct vmig_vm_config *cfg = vmig_vm_config(vm);
	struct vmig_guest_progress gp;
	struct json_object *o = vmig_ctl_reply_ok();

	if (!o)
		return NULL;
	json_object_object_add(o, "name", json_object_new_string(cfg->name));
	json_object_object_add(o, "state",
			       json_object_new_string(vmig_vm_state_name(vmig_vm_state(vm))));
	json_object_object_add(o, "pid", json_object_new_int(getpid()));
	json_object_object_add(o, "memory", json_object_new_uint64(cfg->mem_size));
	json_object_object_add(o, "vcpus", json_object_new_int((int)cfg->nr_vcpus));
	json_object_object_add(o, "uptime_ms", json_object_new_uint64(vmig_vm_uptime_ms(vm)));
	if (cfg->workload)
		json_object_object_add(o, "workload", json_object_new_string(cfg->workload));
	if (vmig_guest_progress(vm, &gp) == 0 && gp.present) {
		struct json_object *g = json_object_new_object();

		json_object_object_add(g, "vcpus", json_object_new_int((int)gp.nr_vcpus));
		json_object_object_add(g, "generation", json_object_new_uint64(gp.generation));
		json_object_object_add(g, "pages_written",
				       json_object_new_uint64(gp.pages_written));
		json_object_object_add(o, "guest", g);
		/* Flat copies for scripts that want the counters directly. */
		json_object_object_add(o, "generation", json_object_new_uint64(gp.generation));
		json_object_object_add(o, "pages_written",
				       json_object_new_uint64(gp.pages_written));
	}
	return o;
}

static struct json_object *handle_request(struct server *s, struct json_object *req)
{
	struct json_object *cmdo;
	const char *cmd;
	int ret;

	if (!json_object_object_get_ex(req, "cmd", &cmdo) ||
	    !json_object_is_type(cmdo, json_type_string))
		return vmig_ctl_reply_error(EINVAL, "request has no \"cmd\" string");
	cmd = json_object_get_string(cmdo);

	if (!strcmp(cmd, "status"))
		return cli_vm_status_json(s->vm);
	if (!strcmp(cmd, "pause")) {
		ret = vmig_vm_pause(s->vm);
		if (ret)
			return vmig_ctl_reply_error(ret, "cannot pause: the VM has stopped");
		vmig_log(VMIG_LOG_INFO, "paused");
		return cli_vm_status_json(s->vm);
	}
	if (!strcmp(cmd, "resume")) {
		ret = vmig_vm_resume(s->vm);
		if (ret)
			return vmig_ctl_reply_error(ret, "cannot resume: the VM has stopped");
		vmig_log(VMIG_LOG_INFO, "resumed");
		return cli_vm_status_json(s->vm);
	}
	if (!strcmp(cmd, "stop")) {
		s->quit = true;
		s->exit_code = VMIG_EXIT_OK;
		return vmig_ctl_reply_ok();
	}
	return vmig_ctl_reply_error(EOPNOTSUPP, "unknown command \"%s\" (expected status, "
				    "pause, resume or stop)", cmd);
}

static void drop_client(struct server *s, unsigned int i)
{
	vmig_ctl_reader_fini(&s->clients[i].reader);
	close(s->clients[i].fd);
	s->clients[i] = s->clients[--s->nr_clients];
	/* The moved reader points at its own fd: keep the pair together. */
	s->clients[i].reader.fd = s->clients[i].fd;
}

/* Serve what client @i has sent.  Returns false if it was dropped. */
static bool serve_client(struct server *s, unsigned int i)
{
	struct client *c = &s->clients[i];

	for (;;) {
		struct json_object *req = NULL, *reply;
		int ret = vmig_ctl_recv(&c->reader, &req);

		if (ret == -EAGAIN)
			return true;
		if (ret == -EPROTO) {
			reply = vmig_ctl_reply_error(EPROTO, "malformed request: "
						     "send one JSON object per line");
		} else if (ret < 0) {
			drop_client(s, i);
			return false;
		} else {
			reply = handle_request(s, req);
			json_object_put(req);
		}
		ret = reply ? vmig_ctl_send(c->fd, reply) : -ENOMEM;
		json_object_put(reply);
		if (ret < 0) {
			drop_client(s, i);
			return false;
		}
		if (s->quit)
			return true;
	}
}

static void accept_client(struct server *s)
{
	int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);

	if (fd < 0)
		return;
	if (s->nr_clients == MAX_CLIENTS) {
		struct json_object *e = vmig_ctl_reply_error(EBUSY, "too many control clients");

		vmig_ctl_send(fd, e);
		json_object_put(e);
		close(fd);
		return;
	}
	s->clients[s->nr_clients].fd = fd;
	vmig_ctl_reader_init(&s->clients[s->nr_clients].reader, fd);
	s->nr_clients++;
}

static void read_signal(struct server *s)
{
	struct signalfd_siginfo si;

	while (read(s->signal_fd, &si, sizeof(si)) == sizeof(si)) {
		vmig_log(VMIG_LOG_INFO, "signal %u: stopping the VM", si.ssi_signo);
		fprintf(stderr, "vmig: %s: stopping VM '%s'\n", strsignal((int)si.ssi_signo),
			vmig_vm_config(s->vm)->name);
		s->quit = true;
		s->exit_code = VMIG_EXIT_OK;
	}
}

static void read_vm_event(struct server *s)
{
	uint64_t v;
	int code;

	if (read(vmig_vm_event_fd(s->vm), &v, sizeof(v)) != sizeof(v))
		return;
	code = vmig_vm_exit_code(s->vm);
	fprintf(stderr, "vmig: VM '%s': %s\n", vmig_vm_config(s->vm)->name,
		vmig_vm_stop_reason(s->vm));
	s->quit = true;
	s->exit_code = code == 0 ? VMIG_EXIT_OK : VMIG_EXIT_ERROR;
}

int cli_control_serve(struct vmig_vm *vm, int listen_fd, int signal_fd)
{
	struct server s = { .vm = vm, .listen_fd = listen_fd, .signal_fd = signal_fd };
	struct pollfd pfd[3 + MAX_CLIENTS];
	unsigned int i, n;

	while (!s.quit) {
		pfd[0] = (struct pollfd){ .fd = listen_fd, .events = POLLIN };
		pfd[1] = (struct pollfd){ .fd = signal_fd, .events = POLLIN };
		pfd[2] = (struct pollfd){ .fd = vmig_vm_event_fd(vm), .events = POLLIN };
		n = s.nr_clients;
		for (i = 0; i < n; i++)
			pfd[3 + i] = (struct pollfd){ .fd = s.clients[i].fd, .events = POLLIN };
		if (poll(pfd, 3 + n, -1) < 0) {
			if (errno == EINTR)
				continue;
			vmig_log(VMIG_LOG_ERROR, "poll: %s", strerror(errno));
			s.exit_code = VMIG_EXIT_ERROR;
			break;
		}
		if (pfd[1].revents)
			read_signal(&s);
		if (pfd[2].revents)
			read_vm_event(&s);
		/* Clients last: their indexes move as they are dropped. */
		for (i = n; i-- > 0 && !s.quit;)
			if (pfd[3 + i].revents)
				serve_client(&s, i);
		if (pfd[0].revents && !s.quit)
			accept_client(&s);
	}
	while (s.nr_clients)
		drop_client(&s, 0);
	vmig_vm_stop(vm);
	return s.exit_code;
}
