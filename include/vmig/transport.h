/*
 * vmig transports: reliable, ordered byte streams that carry a migration.
 *
 * A transport is a struct of function pointers plus a little common state,
 * one backend per file (the shape of redis' rio): fd.c for file
 * descriptors, unix and TCP sockets, file.c for save/restore files.  The
 * migration stream (include/vmig/stream.h) is written on top of any of
 * them and knows nothing about sockets.
 *
 * Addresses are URIs:
 *   tcp://HOST:PORT   HOST a name, an IPv4 address or [an IPv6 address]
 *   unix:PATH         a unix stream socket
 *   file:PATH         a regular file (save/restore)
 *   fd:N              an inherited, already connected file descriptor
 *   ssh://[USER@]HOST[:PORT]  `vmig incoming --stdio` run on HOST through
 *                     SSH (transport/ssh.c; connect only)
 *   rdma://HOST:PORT  an RDMA reliable connection (transport/rdma.c, built
 *                     with --with-rdma), HOST as for tcp://
 *
 * Threads: a transport belongs to one reading thread and one writing
 * thread at a time (a socket may be read by one thread while another
 * writes it); nothing here takes a lock.  All functions that can fail
 * return 0 (or a byte count) or a negative errno value.
 *
 * Failures of reads and writes are also recorded, once (first error wins),
 * in the transport's error context with a message that names the address
 * ("tcp://10.0.0.2:4444: connection reset by peer"); see
 * vmig_transport_err().  A clean end of stream is not an error there:
 * callers decide whether EOF was expected.
 */
#ifndef VMIG_TRANSPORT_H
#define VMIG_TRANSPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "vmig/util.h"

/* ------------------------------------------------------------------------
 * URIs
 */

enum vmig_uri_kind {
	VMIG_URI_TCP = 1,
	VMIG_URI_UNIX,
	VMIG_URI_FILE,
	VMIG_URI_FD,
	VMIG_URI_SSH,
	VMIG_URI_RDMA,
};

/* Longest unix socket path (sizeof(sun_path) - 1). */
#define VMIG_UNIX_PATH_MAX 107

struct vmig_uri {
	enum vmig_uri_kind kind;
	char host[256];          /* tcp, rdma: name or address, without [] */
	uint16_t port;           /* tcp, rdma: 0 asks listen for an ephemeral port */
	char path[4096];         /* unix, file */
	int fd;                  /* fd */
	char user[256];          /* ssh: login name, "" = the local user */
};

/*
 * Parse @uri into @out.  The scheme is case-insensitive.  Errors (-EINVAL,
 * with a message in @err) name what is wrong and what was expected:
 * "unsupported URI scheme 'ftp' (expected tcp://HOST:PORT, unix:PATH or
 * file:PATH)", a missing or bad port, an unbracketed IPv6 address, an empty
 * path, a unix socket path longer than VMIG_UNIX_PATH_MAX (-ENAMETOOLONG).
 * Port 0 parses (listen picks a port); connect refuses it.
 */
int vmig_transport_parse_uri(const char *uri, struct vmig_uri *out,
			     struct vmig_err *err);

/* Canonical form ("tcp://[::1]:4444", "unix:/run/x").  0 or -ENOSPC. */
int vmig_uri_format(const struct vmig_uri *uri, char *buf, size_t len);

/* ------------------------------------------------------------------------
 * Transports
 */

struct vmig_transport;
struct vmig_transport_mem_ops;

/*
 * A backend.  Every callback runs in the caller's thread and returns
 * -errno on failure, having recorded a message naming t->desc in t->err
 * (backends in transport/ use vmig__transport_fail(); others may fill
 * t->err directly if only one thread uses the transport).
 */
struct vmig_transport_ops {
	const char *kind;        /* "tcp", "unix", "fd", "file", "ssh" */
	/* Read 1..@len bytes; 0 at end of stream; honours t->timeout_ms. */
	ssize_t (*read)(struct vmig_transport *t, void *buf, size_t len);
	/* Optional: read into an iovec array, as read() (else read() per buffer). */
	ssize_t (*readv)(struct vmig_transport *t, const struct iovec *iov,
			 int iovcnt);
	/* Write 1..@len bytes; never raises SIGPIPE; honours t->timeout_ms. */
	ssize_t (*write)(struct vmig_transport *t, const void *buf, size_t len);
	/* Optional: write part of an iovec array (else write() is looped). */
	ssize_t (*writev)(struct vmig_transport *t, const struct iovec *iov,
			  int iovcnt);
	/*
	 * No more writes: the peer sees end of stream once it has read
	 * everything (sockets: shutdown(SHUT_WR); files: fsync, which is
	 * where a full disk may show up).  Optional.
	 */
	int (*shutdown_write)(struct vmig_transport *t);
	/* Apply t->timeout_ms to the underlying object.  Optional. */
	int (*set_timeout)(struct vmig_transport *t);
	/* Free everything, close fds. */
	void (*close)(struct vmig_transport *t);
	/* An fd to poll for readability, or -1.  Optional. */
	int (*fd)(struct vmig_transport *t);
	/* Direct placement of guest memory (RDMA), or NULL.  See below. */
	const struct vmig_transport_mem_ops *mem;
};

/* Common state; backends embed it as their first member. */
struct vmig_transport {
	const struct vmig_transport_ops *ops;
	char desc[4200];         /* canonical address, for messages */
	int timeout_ms;          /* per read/write wait; -1 = none */
	uint64_t bytes_read, bytes_written;
	struct vmig_err err;     /* first failure, message names desc */
	int err_claimed;         /* atomic: the reading and the writing thread
				  * may fail at once; one of them fills err */
};

/*
 * For backends: set the common fields (@desc is cut to fit, no timeout,
 * no error).  A backend's ops->close frees the object that embeds @t.
 */
void vmig_transport_init(struct vmig_transport *t,
			 const struct vmig_transport_ops *ops, const char *desc);

/*
 * Defaults for TCP.  Keepalive probes start after KEEPIDLE seconds of
 * silence and are sent every KEEPINTVL seconds; after KEEPCNT unanswered
 * ones the connection fails.  TCP_USER_TIMEOUT fails it as well when sent
 * data stays unacknowledged that long.  Together, a dead peer or a cut
 * link is noticed within about 10 seconds instead of the kernel's ~2 hours
 * (idle) or ~15 minutes (retransmissions).
 */
#define VMIG_TCP_KEEPIDLE_S      5
#define VMIG_TCP_KEEPINTVL_S     1
#define VMIG_TCP_KEEPCNT         5
#define VMIG_TCP_USER_TIMEOUT_MS 10000
/*
 * Socket buffer size asked for with SO_{SND,RCV}BUFFORCE (needs
 * CAP_NET_ADMIN).  Without the capability TCP keeps the kernel's
 * autotuning, which grows further than a capped SO_SNDBUF would; unix
 * sockets fall back to SO_SNDBUF (capped by net.core.wmem_max).
 */
#define VMIG_SOCKET_BUFFER       (8u << 20)

/*
 * Connect to @uri: tcp (every address of HOST in turn, non-blocking
 * connect bounded by @timeout_ms, -1 = the kernel's), unix, fd:N (takes
 * ownership of N) or file:PATH (opens PATH for writing, as
 * vmig_transport_open_file(PATH, true)).  TCP sockets get TCP_NODELAY,
 * the keepalive settings above and large buffers.
 *
 * Returns 0 and a transport in *out, or -errno with a message naming the
 * address in @err: "cannot connect to tcp://127.0.0.1:4444: connection
 * refused (is vmig incoming listening there?)", "... no answer within
 * 5000 ms", "cannot resolve 'foo' in tcp://foo:1: ...".
 */
int vmig_transport_connect(const char *uri, int timeout_ms,
			   struct vmig_transport **out, struct vmig_err *err);

/*
 * Wrap connected file descriptors (a socket, a pipe pair such as
 * stdin/stdout for `vmig incoming --stdio`, a tty).  @rfd and @wfd may be
 * equal.  Takes ownership: vmig_transport_close() closes them (once when
 * equal); on failure they are closed too.  Pass dup()s to keep the
 * originals.  Pipe writes block SIGPIPE in the writing thread around the
 * write, so a vanished reader costs -EPIPE, never the process.
 * Returns 0 or -ENOMEM, -EBADF.
 */
int vmig_transport_from_fds(int rfd, int wfd, struct vmig_transport **out);

/*
 * Open @path for a save (@write: created or truncated, mode 0600, because
 * it will hold guest memory) or a restore (read).  Writes go straight to
 * the file; vmig_transport_shutdown_write() fsyncs it, and a full file
 * system shows up as -ENOSPC with a message saying so, on a write or
 * there.  Returns 0 or -errno with a message naming @path in @err.
 */
int vmig_transport_open_file(const char *path, bool write,
			     struct vmig_transport **out, struct vmig_err *err);

/* Close and free.  NULL-safe.  Does not fsync: call shutdown_write. */
void vmig_transport_close(struct vmig_transport *t);

/*
 * Read up to @len bytes (at least 1, unless at end of stream).  Returns the
 * count, 0 at end of stream, -ETIMEDOUT if nothing came within the
 * timeout, or another -errno.
 */
ssize_t vmig_transport_read(struct vmig_transport *t, void *buf, size_t len);

/*
 * Read exactly @len bytes.  Returns 0; -EPIPE if the stream ends cleanly
 * before @len bytes; -ETIMEDOUT; or another -errno.
 */
int vmig_transport_read_full(struct vmig_transport *t, void *buf, size_t len);
/*
 * Fill the @iovcnt buffers of @iov in order (the array is not modified),
 * with as few system calls as the backend allows.  Returns as
 * vmig_transport_read_full().
 */
int vmig_transport_readv_full(struct vmig_transport *t, const struct iovec *iov,
			      int iovcnt);

/*
 * Write all of @len bytes / of the @iovcnt buffers of @iov (the array is
 * not modified).  Returns 0; -EPIPE or -ECONNRESET when the peer has gone;
 * -ETIMEDOUT if no progress within the timeout; -ENOSPC (files);
 * another -errno.  After a failure the stream is out of step: close it.
 */
int vmig_transport_write_full(struct vmig_transport *t, const void *buf,
			      size_t len);
int vmig_transport_writev_full(struct vmig_transport *t,
			       const struct iovec *iov, int iovcnt);

/* See the shutdown_write op.  0 if the backend has no such notion. */
int vmig_transport_shutdown_write(struct vmig_transport *t);

/*
 * Bound each later read/write wait to @timeout_ms (-1 = wait forever, the
 * default); a wait that expires fails with -ETIMEDOUT.  Not for files.
 * Returns 0 or -errno.
 */
int vmig_transport_set_timeout(struct vmig_transport *t, int timeout_ms);

/* An fd that polls readable when data (or EOF) is there, or -1. */
int vmig_transport_fd(struct vmig_transport *t);

/* "tcp://127.0.0.1:4444", "unix:/run/x", "file:/x", "fd:3,4". */
const char *vmig_transport_desc(const struct vmig_transport *t);

/* The first read/write failure recorded (code 0 if none). */
const struct vmig_err *vmig_transport_err(const struct vmig_transport *t);

/* ------------------------------------------------------------------------
 * Listeners (tcp, rdma and unix)
 */

struct vmig_listener;

/*
 * Listen on @uri: tcp://HOST:PORT (PORT 0: the kernel picks one, see
 * vmig_listener_uri()), rdma://HOST:PORT (the same, in the RDMA
 * connection manager's port space; -ENODEV without an RDMA device,
 * -EPROTONOSUPPORT in a build without RDMA), or unix:PATH (mode 0600; a
 * stale socket file is replaced, a live one is -EADDRINUSE, a non-socket
 * -EEXIST; the file is removed again by vmig_listener_close()).  file: and fd: cannot listen.
 * Returns 0 or -errno with a message naming the address in @err.
 */
int vmig_transport_listen(const char *uri, struct vmig_listener **out,
			  struct vmig_err *err);

/*
 * Wait up to @timeout_ms (-1 = forever) for one connection.  The new
 * transport's desc names the peer ("tcp://127.0.0.1:51234").  Returns 0,
 * -ETIMEDOUT ("no connection on tcp://...: waited 5000 ms"), or -errno,
 * with a message in @err.
 */
int vmig_transport_accept(struct vmig_listener *l, int timeout_ms,
			  struct vmig_transport **out, struct vmig_err *err);

/* The address really listened on, with the port the kernel chose. */
const char *vmig_listener_uri(const struct vmig_listener *l);

/* The listening fd, to poll for readability alongside other fds. */
int vmig_listener_fd(const struct vmig_listener *l);

/* Close; removes a unix socket file it created.  NULL-safe. */
void vmig_listener_close(struct vmig_listener *l);

/*
 * Can rdma:// work on this host?  0 if vmig has RDMA support and an RDMA
 * device is there; else -EPROTONOSUPPORT (built without it) or -ENODEV,
 * with the reason and what to do in @err.
 */
int vmig_transport_rdma_check(struct vmig_err *err);

/* ------------------------------------------------------------------------
 * Direct placement of guest memory (rdma:// only; docs/rdma.md)
 *
 * On an RDMA transport the destination can register guest RAM with the
 * NIC and let the source write pages straight into it (RDMA WRITE), so
 * page data bypasses the byte stream, the stream reader and the
 * destination's CPU.  The byte stream still carries every control record.
 *
 * Destination (the thread that reads the stream), after CONFIG, once
 * guest RAM exists and before reading on: expose_memory() for each RAM
 * region, then expose_done(0) -- or expose_done(-errno) after a failure,
 * which tells the source to send pages in PAGES records instead.  After
 * reading SWITCHOVER (the source fenced before writing it, so every page
 * has landed), and before starting vCPUs: unexpose_memory(), so nothing
 * can write into the running guest any more.
 *
 * Source (the migration thread, the stream's writer): after writing and
 * flushing CONFIG, peer_memory() waits for the destination's answer.  If it
 * returns 0, every page copy from then on goes through write_mem() (zero
 * pages too: the source writes zeros) and no PAGES record is sent; a page
 * copy in a PAGES record that the destination applies late could
 * otherwise overwrite a newer copy written directly.  Writes execute in
 * order on the connection, so a later copy of a page never lands before
 * an earlier one.  Before each ITER_END and before SWITCHOVER, mem_fence()
 * waits until every write is acknowledged, so failures surface before
 * the source commits.
 *
 * All return 0 or -errno, and -EOPNOTSUPP on transports without direct
 * placement.  A failure of the connection is recorded in
 * vmig_transport_err() as for reads and writes; the caller's own mistakes
 * (-EINVAL, -ERANGE, -E2BIG, -EOPNOTSUPP) are not: they leave the
 * connection usable.
 */
struct vmig_transport_mem_ops {
	int (*expose)(struct vmig_transport *t, void *hva, size_t len, uint64_t gpa);
	int (*expose_done)(struct vmig_transport *t, int status);
	int (*unexpose)(struct vmig_transport *t);
	int (*peer_memory)(struct vmig_transport *t, int timeout_ms);
	int (*write_mem)(struct vmig_transport *t, uint64_t gpa, const void *src,
			 size_t len);
	int (*fence)(struct vmig_transport *t);
};

/* The largest number of regions a destination may expose. */
#define VMIG_TRANSPORT_MAX_MEM_REGIONS 64

/*
 * Destination: register [@hva, @hva + @len), guest-physical @gpa onwards,
 * for remote writes and announce it to the peer.  @hva and @len page
 * aligned.  -EOPNOTSUPP, -ENOMEM (pinning failed: RLIMIT_MEMLOCK?), -E2BIG
 * (too many regions), -EINVAL, -ECONNRESET.
 */
int vmig_transport_expose_memory(struct vmig_transport *t, void *hva, size_t len,
				 uint64_t gpa);

/* Destination: the list is complete (@status 0), or declined (-errno). */
int vmig_transport_expose_done(struct vmig_transport *t, int status);

/* Destination: deregister every exposed region.  Idempotent. */
int vmig_transport_unexpose_memory(struct vmig_transport *t);

/*
 * Source: wait up to @timeout_ms (-1: the transport's timeout) for the
 * destination's expose_done().  0: write_mem() may be used for every
 * announced region; -EOPNOTSUPP: not RDMA, or the destination declined
 * (send PAGES records); -ETIMEDOUT; -ECONNRESET.
 */
int vmig_transport_peer_memory(struct vmig_transport *t, int timeout_ms);

/*
 * Source: write @len bytes from @src to guest-physical @gpa on the peer.
 * [@gpa, @gpa + @len) must lie in one announced region (-ERANGE).  @src is
 * copied before the call returns (it may change afterwards); the write
 * itself completes later.  Counts in t->bytes_written.
 */
int vmig_transport_write_mem(struct vmig_transport *t, uint64_t gpa,
			     const void *src, size_t len);

/* Source: wait until every write_mem() so far is acknowledged by the peer. */
int vmig_transport_mem_fence(struct vmig_transport *t);

/* ------------------------------------------------------------------------
 * SSH (transport/ssh.c)
 *
 * `vmig migrate NAME ssh://[USER@]HOST[:PORT]` logs in to HOST with
 * libssh2 and runs `vmig incoming --stdio [--name DEST]` there; the
 * migration stream goes to that command's stdin and its replies come back
 * on its stdout, over one SSH channel.
 *
 * Unlike the fd backends, an SSH transport must be used by one thread at
 * a time for reading and writing alike (a libssh2 session is not
 * thread-safe); the source's migration thread is the only user.
 */

/* Receive window and largest packet asked for on the channel. */
#define VMIG_SSH_WINDOW          (16u << 20)
#define VMIG_SSH_PACKET          32768u
/* An SSH keepalive goes out after this many idle seconds. */
#define VMIG_SSH_KEEPALIVE_S     5

struct vmig_ssh_options {
	/* The remote command, run by the remote user's shell as given (it may
	 * be a path, or carry an env prefix); NULL: "vmig". */
	const char *remote_vmig;
	/* --name for the remote `vmig incoming`, or NULL (the source's name). */
	const char *dest_name;
	/* OpenSSH known_hosts file; NULL: ~/.ssh/known_hosts. */
	const char *known_hosts;
	/* Record the key of a host not in known_hosts yet (never replaces a
	 * changed key), like OpenSSH's StrictHostKeyChecking=accept-new. */
	bool accept_new_host_key;
	/* Private key file to log in with after the agent's keys; NULL: the
	 * first of ~/.ssh/id_ed25519, id_ecdsa, id_rsa that exist. */
	const char *identity;
	/* ssh-agent socket; NULL: $SSH_AUTH_SOCK; "": no agent. */
	const char *agent_socket;
	/* What follows REMOTE_VMIG on the remote command line, as the remote
	 * shell parses it; NULL: "incoming --stdio [--name DEST]" (see
	 * vmig_ssh_exec() in transport/ssh-exec.c). */
	const char *remote_args;
};

/*
 * Connect to @uri (ssh://[USER@]HOST[:PORT], PORT 22 by default, USER the
 * local user by default) with @opts (NULL: all defaults):
 *
 *  - TCP with keepalives as for tcp:// (a dead host is noticed in about
 *    10 s), the SSH handshake preferring fast ciphers;
 *  - the host key checked against known_hosts (OpenSSH format, hashed
 *    entries too) before any credential is offered: an unknown or a
 *    changed key is refused with its SHA256 fingerprint and what to do;
 *  - public-key authentication, never a prompt: the agent's keys, then the
 *    identity file(s);
 *  - a session channel running `REMOTE_VMIG incoming --stdio [--name
 *    DEST]`.
 *
 * All of it within @timeout_ms (-1: no limit).  Returns 0 and the
 * transport in *out, or -errno with a message naming the address in @err:
 * -ECONNREFUSED & co for TCP, -EKEYREJECTED (changed host key), -ENOKEY
 * (unknown host key), -EACCES (authentication), -EPROTO (SSH itself).
 *
 * Reads and writes honour the transport's timeout; a remote command that
 * ends (vmig missing there, it exited, it was killed) fails them with its
 * exit status and the last line it wrote to stderr.  The transport's fd
 * (vmig_transport_fd) is an eventfd that polls readable once a reply or
 * the end of the replies has been received, as seen by the last call on
 * the transport (vmig_transport_fd itself takes in what has arrived): poll
 * it with a zero timeout between reads and writes, not to sleep on.
 */
int vmig_transport_connect_ssh(const char *uri, const struct vmig_ssh_options *opts,
			       int timeout_ms, struct vmig_transport **out,
			       struct vmig_err *err);

/*
 * The round trip time of @t's connection as TCP measures it (its set-up
 * took several round trips and some crypto, so timing that would
 * overestimate it badly), in ns; 0 if unknown or @t is not SSH.
 */
uint64_t vmig_transport_ssh_rtt_ns(struct vmig_transport *t);

/*
 * A copy of @in in one allocation (release it with free()), or NULL when
 * out of memory.  @in NULL copies the defaults.
 */
struct vmig_ssh_options *vmig_ssh_options_dup(const struct vmig_ssh_options *in);

/*
 * The command run on the remote host for @opts, as the remote shell sees
 * it ("vmig incoming --stdio --name 'web1'").  0 or -ENOSPC.
 */
int vmig_ssh_remote_command(const struct vmig_ssh_options *opts, char *buf, size_t len);

/*
 * Run `REMOTE_VMIG ARGS` on the host of @uri, logged in exactly as
 * vmig_transport_connect_ssh() does (host key checked first, public-key
 * authentication, never a prompt), with an empty stdin, and collect its
 * standard output (at most @max_out bytes, NUL-terminated, in *out, to be
 * freed with free()).  @opts->remote_args is ignored: @args replaces it.
 * The whole exchange is bounded by @timeout_ms (-1: no limit).
 *
 * Returns 0 when the command exited with status 0; otherwise -errno with
 * a message naming the host in @err: the connect errors of
 * vmig_transport_connect_ssh(), -ENOENT (command not found there),
 * -EPIPE (non-zero exit status, with the last line of its stderr),
 * -EMSGSIZE (more output than @max_out), -ETIMEDOUT.  Blocking; any
 * thread (each call has its own session).
 */
int vmig_ssh_exec(const char *uri, const struct vmig_ssh_options *opts, const char *args,
		  int timeout_ms, size_t max_out, char **out, struct vmig_err *err);

#endif /* VMIG_TRANSPORT_H */
