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

#include "vmig/migrate.h"
#include "vmig/transport.h"
#include "vmig/util.h"
#include "vmig/vm.h"
#include "cli.h"

#define MAX_CLIENTS 16

struct client {
	int fd;
	struct vmig_ctl_reader reader;
	bool subscribed;          /* gets the migration's progress and result */
};

struct server {
	struct vmig_vm *vm;
	int listen_fd;
	int signal_fd;
	struct client clients[MAX_CLIENTS];
	unsigned int nr_clients;
	bool quit;
	int exit_code;
	struct vmig_migration *mig;            /* the running migration, or NULL */
	bool have_last;
	struct vmig_migrate_stats last;        /* the last one's final stats */
	bool uncertain;                        /* handoff-uncertain: paused, held */
	bool saving;                           /* the migration is a save */
	bool keep_running;                     /* save: the VM goes on afterwards */
};

static struct server *the_server;   /* for status of the migration */

struct json_object *cli_vm_status_json(struct vmig_vm *vm)
{
	const struct vmig_vm_config *cfg = vmig_vm_config(vm);
	struct vmig_guest_progress gp;
	struct json_object *o = vmig_ctl_reply_ok();

	if (!o)
		return NULL;
	json_object_object_add(o, "name", json_object_new_string(cfg->name));
	json_object_object_add(o, "state", json_object_new_string(
		the_server && the_server->uncertain ? "handoff-uncertain" :
		vmig_vm_state_name(vmig_vm_state(vm))));
	if (the_server && (the_server->mig || the_server->have_last)) {
		struct vmig_migrate_stats st;

		if (the_server->mig)
			vmig_migrate_src_stats(the_server->mig, &st);
		else
			st = the_server->last;
		json_object_object_add(o, "migration", vmig_migrate_stats_json(&st));
	}
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
		json_object_object_add(g, "heartbeat", json_object_new_uint64(gp.heartbeat));
		json_object_object_add(o, "guest", g);
		/* Flat copies for scripts that want the counters directly. */
		json_object_object_add(o, "generation", json_object_new_uint64(gp.generation));
		json_object_object_add(o, "pages_written",
				       json_object_new_uint64(gp.pages_written));
	}
	return o;
}

static uint64_t jnum(struct json_object *req, const char *key, uint64_t dflt)
{
	struct json_object *v;

	return json_object_object_get_ex(req, key, &v) ? (uint64_t)json_object_get_int64(v) : dflt;
}

static bool jbool(struct json_object *req, const char *key, bool dflt)
{
	struct json_object *v;

	return json_object_object_get_ex(req, key, &v) ? json_object_get_boolean(v) : dflt;
}

/* A string member of @o, or NULL. */
static const char *jstr_or_null(struct json_object *o, const char *key)
{
	struct json_object *v;

	return json_object_object_get_ex(o, key, &v) && json_object_is_type(v, json_type_string) ?
		json_object_get_string(v) : NULL;
}

/* "migrate" {uri, max_downtime_ms, timeout_s, on_timeout, compress (true,
 * false, "lz4", "none", "auto"), bandwidth_bps, channels, max_throttle, resume,
 * stream_version (1 or 2),
 * ssh: {remote_vmig, dest_name, known_hosts, accept_new_host_key, identity,
 * agent_socket}} or "save" {path, keep_running}: the client then receives
 * the progress. */
static struct json_object *start_migration(struct server *s, struct client *c,
					   struct json_object *req, bool save)
{
	struct vmig_migrate_params p = {
		.max_downtime_ms = 300,
		.on_timeout = VMIG_ON_TIMEOUT_CANCEL,
		.compress = VMIG_COMPRESS_AUTO,
		.throttle_initial = 20,
		.throttle_step = 10,
		.throttle_max = VMIG_VM_MAX_THROTTLE,
	};
	struct vmig_err err = { 0 };
	struct vmig_ssh_options ssh = { 0 };
	struct json_object *v, *reply;
	char uri[4200];
	int ret;

	if (s->mig)
		return vmig_ctl_reply_error(EBUSY, "a migration is already in progress");
	if (s->uncertain)
		return vmig_ctl_reply_error(EBUSY, "the last handoff is uncertain: resolve it first");
	if (vmig_vm_state(s->vm) == VMIG_VM_STOPPED)
		return vmig_ctl_reply_error(ESHUTDOWN, "the VM has stopped");
	if (save) {
		if (!json_object_object_get_ex(req, "path", &v) ||
		    !json_object_is_type(v, json_type_string))
			return vmig_ctl_reply_error(EINVAL, "save needs a \"path\"");
		snprintf(uri, sizeof(uri), "file:%s", json_object_get_string(v));
		p.max_downtime_ms = UINT32_MAX;
		p.stop_after = !jbool(req, "keep_running", false);
	} else {
		if (!json_object_object_get_ex(req, "uri", &v) ||
		    !json_object_is_type(v, json_type_string))
			return vmig_ctl_reply_error(EINVAL, "migrate needs a \"uri\"");
		snprintf(uri, sizeof(uri), "%s", json_object_get_string(v));
		p.max_downtime_ms = (uint32_t)jnum(req, "max_downtime_ms", 300);
		p.timeout_s = (uint32_t)jnum(req, "timeout_s", 0);
		if (json_object_object_get_ex(req, "on_timeout", &v)) {
			const char *t = json_object_get_string(v);

			if (!strcmp(t, "force"))
				p.on_timeout = VMIG_ON_TIMEOUT_FORCE;
			else if (strcmp(t, "cancel"))
				return vmig_ctl_reply_error(EINVAL, "on_timeout must be "
							    "\"cancel\" or \"force\"");
		}
		if (json_object_object_get_ex(req, "compress", &v)) {
			const char *cm = json_object_is_type(v, json_type_string) ?
					 json_object_get_string(v) : NULL;

			if (json_object_is_type(v, json_type_boolean))
				p.compress = json_object_get_boolean(v) ? VMIG_COMPRESS_LZ4
									: VMIG_COMPRESS_NONE;
			else if (cm && !strcmp(cm, "lz4"))
				p.compress = VMIG_COMPRESS_LZ4;
			else if (cm && !strcmp(cm, "none"))
				p.compress = VMIG_COMPRESS_NONE;
			else if (!cm || strcmp(cm, "auto"))
				return vmig_ctl_reply_error(EINVAL, "compress must be \"lz4\", "
							    "\"none\" or \"auto\"");
		}
		p.bandwidth_bps = jnum(req, "bandwidth_bps", 0);
		p.channels = (unsigned int)jnum(req, "channels", 1);
		p.stream_version = (unsigned int)jnum(req, "stream_version", 0);
		if (p.stream_version > 2)
			return vmig_ctl_reply_error(EINVAL, "stream_version must be 1 or 2");
		if (jnum(req, "max_throttle", VMIG_VM_MAX_THROTTLE) > VMIG_VM_MAX_THROTTLE)
			return vmig_ctl_reply_error(EINVAL, "max_throttle must be 0 to %u",
						    VMIG_VM_MAX_THROTTLE);
		p.throttle_max = (unsigned int)jnum(req, "max_throttle", VMIG_VM_MAX_THROTTLE);
		p.resume_dst = jbool(req, "resume", false);
		if (json_object_object_get_ex(req, "ssh", &v) &&
		    json_object_is_type(v, json_type_object)) {
			/* Strings owned by @req, which outlives the call; src copies. */
			ssh.remote_vmig = jstr_or_null(v, "remote_vmig");
			ssh.dest_name = jstr_or_null(v, "dest_name");
			ssh.known_hosts = jstr_or_null(v, "known_hosts");
			ssh.identity = jstr_or_null(v, "identity");
			ssh.agent_socket = jstr_or_null(v, "agent_socket");
			ssh.accept_new_host_key = jbool(v, "accept_new_host_key", false);
			p.ssh = &ssh;
		}
	}
	p.uri = uri;
	ret = vmig_migrate_src_start(s->vm, &p, &s->mig, &err);
	if (ret)
		return vmig_ctl_reply_error(ret, "%s", err.msg[0] ? err.msg : strerror(-ret));
	s->have_last = false;
	s->saving = save;
	s->keep_running = save && !p.stop_after;
	vmig_log(VMIG_LOG_INFO, "%s to %s started", save ? "save" : "migration", uri);
	c->subscribed = true;
	reply = vmig_ctl_reply_ok();
	json_object_object_add(reply, "event", json_object_new_string("started"));
	return reply;
}

static struct json_object *handle_request(struct server *s, struct client *client,
					  struct json_object *req)
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
	if (!strcmp(cmd, "migrate") || !strcmp(cmd, "save"))
		return start_migration(s, client, req, !strcmp(cmd, "save"));
	if (!strcmp(cmd, "cancel")) {
		if (!s->mig)
			return vmig_ctl_reply_error(ENOENT, "no migration is in progress");
		vmig_migrate_src_cancel(s->mig);
		return vmig_ctl_reply_ok();
	}
	/* "set-bandwidth" {bandwidth_bps}: the running migration's cap, 0 = none. */
	if (!strcmp(cmd, "set-bandwidth")) {
		struct json_object *b;

		if (!s->mig)
			return vmig_ctl_reply_error(ENOENT, "no migration is in progress");
		if (!json_object_object_get_ex(req, "bandwidth_bps", &b) ||
		    !json_object_is_type(b, json_type_int) || json_object_get_int64(b) < 0)
			return vmig_ctl_reply_error(EINVAL, "set-bandwidth needs "
						    "\"bandwidth_bps\" (bytes/s, 0 = none)");
		vmig_migrate_src_set_bandwidth(s->mig, (uint64_t)json_object_get_int64(b));
		return vmig_ctl_reply_ok();
	}
	if ((!strcmp(cmd, "pause") || !strcmp(cmd, "resume")) && s->mig)
		return vmig_ctl_reply_error(EBUSY, "a migration is in progress "
					    "(vmig cancel %s first)", vmig_vm_config(s->vm)->name);
	if (!strcmp(cmd, "resume") && s->uncertain) {
		struct json_object *f;

		if (!json_object_object_get_ex(req, "force", &f) || !json_object_get_boolean(f))
			return vmig_ctl_reply_error(EBUSY, "the handoff is uncertain: the "
				"destination may be running this VM.  Check it with "
				"'vmig status' there; if it does not run the VM, "
				"'vmig resume --force %s' here, else 'vmig stop %s'",
				vmig_vm_config(s->vm)->name, vmig_vm_config(s->vm)->name);
		s->uncertain = false;
	}
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
	/*
	 * "shutdown": ask the guest to power itself off (the built-in guest
	 * through its status page, a Linux guest with its ACPI power button);
	 * the VMM then ends as on any guest power-off.
	 */
	if (!strcmp(cmd, "shutdown")) {
		struct vmig_err err = { 0 };

		if (s->mig)
			return vmig_ctl_reply_error(EBUSY, "a migration is in progress "
						    "(vmig cancel %s first)",
						    vmig_vm_config(s->vm)->name);
		if (vmig_vm_state(s->vm) != VMIG_VM_RUNNING)
			return vmig_ctl_reply_error(EBUSY, "the VM is not running: a paused "
						    "guest cannot shut itself down (vmig "
						    "resume, or vmig stop)");
		ret = vmig_vm_request_poweroff(s->vm, &err);
		if (ret)
			return vmig_ctl_reply_error(ENOTSUP, "this guest cannot be asked to shut "
						    "down now: %s; use vmig stop to end it "
						    "anyway", err.msg);
		vmig_log(VMIG_LOG_INFO, "asked the guest to shut down%s",
			 vmig_vm_can_reboot(s->vm) ? " (ACPI power button)" : "");
		return vmig_ctl_reply_ok();
	}
	if (!strcmp(cmd, "stop")) {
		if (s->mig) {
			/* Before COMMIT this resumes the VM here, which we then stop. */
			vmig_migrate_src_cancel(s->mig);
		}
		s->quit = true;
		s->exit_code = VMIG_EXIT_OK;
		return vmig_ctl_reply_ok();
	}
	return vmig_ctl_reply_error(EOPNOTSUPP, "unknown command \"%s\" (expected status, "
				    "pause, resume, stop, shutdown, migrate, save, cancel or "
				    "set-bandwidth)", cmd);
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
			reply = handle_request(s, c, req);
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

static void broadcast(struct server *s, struct json_object *ev)
{
	unsigned int i;

	for (i = s->nr_clients; i-- > 0;)
		if (s->clients[i].subscribed && vmig_ctl_send(s->clients[i].fd, ev) < 0)
			drop_client(s, i);
}

static void migration_event(struct server *s)
{
	struct vmig_migrate_stats st;
	struct json_object *ev;
	uint64_t v;

	if (read(vmig_migrate_src_event_fd(s->mig), &v, sizeof(v)) != sizeof(v))
		return;
	vmig_migrate_src_stats(s->mig, &st);
	if (!vmig_migrate_status_final(st.status)) {
		ev = vmig_migrate_stats_json(&st);
		json_object_object_add(ev, "event", json_object_new_string("progress"));
		broadcast(s, ev);
		json_object_put(ev);
		return;
	}
	vmig_migrate_src_finish(s->mig, &st);
	s->mig = NULL;
	s->last = st;
	s->have_last = true;
	ev = vmig_migrate_stats_json(&st);
	json_object_object_add(ev, "event", json_object_new_string("result"));
	broadcast(s, ev);
	json_object_put(ev);

	switch (st.status) {
	case VMIG_MIGRATE_COMPLETED:
		/* The destination runs the VM now: this copy is released. */
		if (s->keep_running) {
			fprintf(stderr, "vmig: VM '%s' saved; it keeps running\n",
				vmig_vm_config(s->vm)->name);
			break;
		}
		fprintf(stderr, "vmig: VM '%s' %s; this VMM exits\n", vmig_vm_config(s->vm)->name,
			s->saving ? "saved" : "migrated");
		s->quit = true;
		s->exit_code = VMIG_EXIT_OK;
		break;
	case VMIG_MIGRATE_UNCERTAIN:
		s->uncertain = true;
		fprintf(stderr, "vmig: VM '%s': handoff uncertain: %s; the VM stays paused "
			"here until an admin resolves it\n", vmig_vm_config(s->vm)->name, st.error);
		break;
	default:
		fprintf(stderr, "vmig: VM '%s': migration %s%s%s; the VM runs here\n",
			vmig_vm_config(s->vm)->name, vmig_migrate_status_name(st.status),
			st.error[0] ? ": " : "", st.error);
		break;
	}
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
	struct pollfd pfd[4 + MAX_CLIENTS];
	unsigned int i, n;

	the_server = &s;
	while (!s.quit || s.mig) {
		if (s.quit && s.mig) {
			/* Stopping: let the migration wind down (it was cancelled). */
			vmig_migrate_src_cancel(s.mig);
		}
		pfd[0] = (struct pollfd){ .fd = listen_fd, .events = POLLIN };
		pfd[1] = (struct pollfd){ .fd = signal_fd, .events = POLLIN };
		pfd[2] = (struct pollfd){ .fd = vmig_vm_event_fd(vm), .events = POLLIN };
		pfd[3] = (struct pollfd){ .fd = s.mig ? vmig_migrate_src_event_fd(s.mig) : -1,
					  .events = POLLIN };
		n = s.nr_clients;
		for (i = 0; i < n; i++)
			pfd[4 + i] = (struct pollfd){ .fd = s.clients[i].fd, .events = POLLIN };
		if (poll(pfd, 4 + n, -1) < 0) {
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
		if (s.mig && pfd[3].revents)
			migration_event(&s);
		/* Clients last: their indexes move as they are dropped. */
		for (i = n; i-- > 0 && !s.quit;)
			if (i < s.nr_clients && pfd[4 + i].revents)
				serve_client(&s, i);
		if (pfd[0].revents && !s.quit)
			accept_client(&s);
	}
	while (s.nr_clients)
		drop_client(&s, 0);
	the_server = NULL;
	vmig_vm_stop(vm);
	return s.exit_code;
}
