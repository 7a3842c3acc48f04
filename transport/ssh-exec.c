/*
 * Run one vmig command on another host through SSH and take its output:
 * `vmig evacuate` asks each target for `vmig host-info --json` this way.
 *
 * It is the SSH transport of transport/ssh.c with another remote command
 * (vmig_ssh_options.remote_args): the same host key checking and
 * authentication as a migration, so a host that a migration could reach
 * answers here too, and one that it could not fails here first, with the
 * same message.  stdin gets EOF at once; stdout is read to its end, and
 * the remote command's exit status decides (ssh.c reports a non-zero one
 * with the last line of its stderr).
 *
 * Threads: each call has its own session; calls may run concurrently.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "transport-internal.h"

static int64_t exec_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int vmig_ssh_exec(const char *uri, const struct vmig_ssh_options *opts, const char *args,
		  int timeout_ms, size_t max_out, char **out, struct vmig_err *err)
{
	int64_t deadline = timeout_ms < 0 ? -1 : exec_now_ms() + timeout_ms;
	struct vmig_ssh_options o = { 0 };
	struct vmig_transport *t = NULL;
	size_t len = 0;
	char *buf;
	int ret;

	*out = NULL;
	if (!args || !*args || max_out == 0) {
		vmig_err_set(err, -EINVAL, "vmig_ssh_exec: no command or no room for output");
		return -EINVAL;
	}
	if (opts)
		o = *opts;
	o.remote_args = args;
	buf = malloc(max_out + 1);
	if (!buf) {
		vmig_err_set(err, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	ret = vmig_transport_connect_ssh(uri, &o, timeout_ms, &t, err);
	if (ret)
		goto fail;
	/* Nothing for its stdin: a command that reads it sees EOF at once. */
	ret = vmig_transport_shutdown_write(t);
	for (;;) {
		int left = -1;
		ssize_t n;

		if (ret)
			break;
		if (deadline >= 0) {
			int64_t l = deadline - exec_now_ms();

			left = l > 0 ? (int)l : 1;
		}
		ret = vmig_transport_set_timeout(t, left);
		if (ret)
			break;
		if (len == max_out) {
			char extra;

			/* Full: only the end of the output may come now. */
			n = vmig_transport_read(t, &extra, 1);
			if (n > 0) {
				vmig_err_set(err, -EMSGSIZE, "%s: the output of '%s' is longer "
					     "than %zu bytes", vmig_transport_desc(t), args, max_out);
				ret = -EMSGSIZE;
				break;
			}
		} else {
			n = vmig_transport_read(t, buf + len, max_out - len);
			if (n > 0) {
				len += (size_t)n;
				continue;
			}
		}
		ret = (int)n;   /* 0: the command ended with status 0 */
		break;
	}
	if (ret && t && vmig_transport_err(t)->code)
		vmig_err_set(err, vmig_transport_err(t)->code, "%s", vmig_transport_err(t)->msg);
	else if (ret)
		vmig_err_set(err, ret, "%s: running '%s': %s", uri, args, strerror(-ret));
	vmig_transport_close(t);
	if (ret)
		goto fail;
	buf[len] = '\0';
	*out = buf;
	return 0;
fail:
	free(buf);
	return ret;
}
