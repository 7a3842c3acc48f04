/*
 * Declarations shared by the transport backends (transport/ only).
 */
#ifndef VMIG_TRANSPORT_INTERNAL_H
#define VMIG_TRANSPORT_INTERNAL_H

#include "vmig/transport.h"

/*
 * Record a failure of @t once: "DESC: message".  @code is -errno.
 * Preserves errno.
 */
void vmig__transport_fail(struct vmig_transport *t, int code,
			  const char *fmt, ...) VMIG_PRINTF(3, 4);

/* A short hint for the admin after an errno, "" if none ("(is ...?)"). */
const char *vmig__transport_hint(int code);

/*
 * Wait until @fd is ready for @events (POLLIN/POLLOUT) or @timeout_ms
 * passes (-1: forever).  0 when ready (or on POLLERR/POLLHUP, so that the
 * next call reports what happened), -ETIMEDOUT, or -errno.
 */
int vmig__poll_one(int fd, short events, int timeout_ms);

/* fd.c: sockets and plain fds. */
int vmig__fd_connect(const struct vmig_uri *u, const char *desc,
		     int timeout_ms, struct vmig_transport **out,
		     struct vmig_err *err);
int vmig__fd_listen(const struct vmig_uri *u, const char *desc,
		    struct vmig_listener **out, struct vmig_err *err);

/* ssh.c: parse what follows "ssh:" in @uri into @out. */
int vmig__ssh_parse_uri(const char *rest, const char *uri, struct vmig_uri *out,
			struct vmig_err *err);

#endif /* VMIG_TRANSPORT_INTERNAL_H */
