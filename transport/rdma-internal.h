/*
 * The RDMA backend's entry points for the rest of transport/ (transport.c
 * dispatches rdma:// URIs here, fd.c's listener delegates to it).  Built
 * with --with-rdma (HAVE_RDMA) from transport/rdma.c; without it,
 * transport.c provides versions that fail with -EPROTONOSUPPORT and
 * VMIG_RDMA_UNBUILT_MSG.
 */
#ifndef VMIG_RDMA_INTERNAL_H
#define VMIG_RDMA_INTERNAL_H

#include "vmig/transport.h"

#define VMIG_RDMA_UNBUILT_MSG "vmig was built without RDMA support (configure --with-rdma)"

struct vmig__rdma_listener;

/* Connect to @u (kind VMIG_URI_RDMA, port != 0), all within @timeout_ms. */
int vmig__rdma_connect(const struct vmig_uri *u, const char *desc, int timeout_ms,
		       struct vmig_transport **out, struct vmig_err *err);

/*
 * Listen on @u.  Returns the listener, the fd to poll for a connection
 * request in *@fd, and the address really listened on (the port filled in)
 * in @uri.
 */
int vmig__rdma_listen(const struct vmig_uri *u, const char *desc,
		      struct vmig__rdma_listener **out, int *fd, char *uri,
		      size_t uri_len, struct vmig_err *err);

/* Wait up to @timeout_ms for one connection on @l and accept it. */
int vmig__rdma_accept(struct vmig__rdma_listener *l, int timeout_ms,
		      struct vmig_transport **out, struct vmig_err *err);

/* NULL-safe; closes the fd given by vmig__rdma_listen too. */
void vmig__rdma_listener_close(struct vmig__rdma_listener *l);

#endif /* VMIG_RDMA_INTERNAL_H */
