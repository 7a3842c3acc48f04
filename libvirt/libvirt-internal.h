/*
 * vmig's libvirt endpoint: cross-file declarations of libvirt/.
 *
 * proto.c   the wire format: packet header, the libvirt types we exchange
 *           (domains, typed parameters, errors), XDR through libtirpc
 * server.c  the socket, connections, one thread per call, keepalive
 * domain.c  the procedures: what each one asks of the VMs' control sockets
 *
 * Our own definitions of the part of libvirt's RPC protocol (program
 * 0x20008086, version 1) that vmig serves; see docs/libvirt.md.
 */
#ifndef VMIG_LIBVIRT_INTERNAL_H
#define VMIG_LIBVIRT_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vmig/util.h"

#include "lv-serve.h"

#include <rpc/types.h>
#include <rpc/xdr.h>

struct json_object;

/* ---- the packet ---- */
#define LV_PROGRAM            0x20008086u   /* libvirt's remote program */
#define LV_PROGRAM_VERSION    1u
#define LV_KEEPALIVE_PROGRAM  0x6b656570u   /* "keep" */
#define LV_KEEPALIVE_VERSION  1u
#define LV_KEEPALIVE_PING     1
#define LV_KEEPALIVE_PONG     2

enum lv_type {
	LV_TYPE_CALL = 0,
	LV_TYPE_REPLY = 1,
	LV_TYPE_MESSAGE = 2,
	LV_TYPE_STREAM = 3,
	LV_TYPE_CALL_WITH_FDS = 4,
	LV_TYPE_REPLY_WITH_FDS = 5,
	LV_TYPE_STREAM_HOLE = 6,
};

enum lv_status {
	LV_STATUS_OK = 0,
	LV_STATUS_ERROR = 1,
	LV_STATUS_CONTINUE = 2,
};

/* A packet: a 4-byte big-endian length (itself included), the header, a body. */
#define LV_LEN_SIZE       4u
#define LV_HEADER_SIZE    24u
/* Largest packet accepted: no call we serve needs more (libvirt's own
 * limit is 32 MiB, for things like screenshots we do not serve). */
#define LV_PACKET_MAX     (4u << 20)
/* Largest reply we build. */
#define LV_REPLY_MAX      (1u << 20)
/* Strings and lists inside a packet. */
#define LV_STRING_MAX     (1u << 20)
#define LV_PARAMS_MAX     64u
#define LV_COOKIE_MAX     (1u << 20)
#define LV_DOMAINS_MAX    16384u

struct lv_header {
	uint32_t prog;
	uint32_t vers;
	int32_t proc;
	int32_t type;
	uint32_t serial;
	int32_t status;
};

/* A domain as it travels: name, UUID, id (-1 when not running). */
struct lv_domain {
	char *name;
	unsigned char uuid[16];
	int32_t id;
};

/* virTypedParameter's wire form; the type numbers are libvirt's. */
struct lv_param {
	char *field;
	int32_t type;
	union {
		int32_t i;
		uint32_t ui;
		int64_t l;
		uint64_t ul;
		double d;
		int32_t b;
		char *s;
	} v;
};

/* An error reply: virterror's code and domain, and a message. */
struct lv_error {
	int code;
	int domain;
	char msg[1024];
};

bool vmig__lv_xdr_header(XDR *x, struct lv_header *h);
/* A string that may not be NULL (decoding allocates; free()). */
bool vmig__lv_xdr_string(XDR *x, char **s);
/* A string that may be NULL. */
bool vmig__lv_xdr_opt_string(XDR *x, char **s);
bool vmig__lv_xdr_domain(XDR *x, struct lv_domain *d);
/* A list of typed parameters: decoding allocates *@p (vmig__lv_params_free). */
bool vmig__lv_xdr_params(XDR *x, struct lv_param **p, uint32_t *n);
void vmig__lv_params_free(struct lv_param *p, uint32_t n);
void vmig__lv_domain_fini(struct lv_domain *d);
bool vmig__lv_xdr_error(XDR *x, const struct lv_error *e);

/*
 * Encode a whole packet into @buf (@cap bytes): length, @h, then @body
 * (NULL for none) with @arg.  Returns its length, or 0 if it did not fit
 * or @body failed.
 */
size_t vmig__lv_pack(char *buf, size_t cap, const struct lv_header *h,
		     bool (*body)(XDR *x, void *arg), void *arg);

/* ---- the server ---- */
struct lv_server;
struct lv_conn;

/* One call being served, on a thread of its own. */
struct lv_call {
	struct lv_conn *conn;
	struct lv_server *srv;
	struct lv_header hdr;
	char *args;              /* the body after the header */
	size_t args_len;
	XDR in;                  /* decodes @args */
	char *reply;             /* LV_REPLY_MAX bytes */
	XDR out;                 /* encodes the reply body after the header */
	struct lv_error err;     /* set by a procedure that fails */
	bool close_after;        /* connect-close: end the connection */
};

/* Set c->err (first error wins) and return -1. */
int vmig__lv_fail(struct lv_call *c, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Serve call @c (domain.c): 0 with the reply body encoded in c->out, or
 * -1 with c->err set. */
int vmig__lv_dispatch(struct lv_call *c);
/* The procedure's name for messages ("domain-get-info"), or NULL. */
const char *vmig__lv_proc_name(int proc);

/* Server-wide settings and state the procedures share. */
struct lv_server {
	char run_dir[4096];
	char config_dir[4096];        /* persistent definitions: NAME.xml */
	char uri[128];                /* what connect-get-uri answers */
	const char *remote_vmig;      /* ssh: the vmig to run on the destination */
	const char *known_hosts;
	const char *identity;
	bool accept_new_host_key;
	/* Held across define, undefine, start and create: the check that a
	 * name or UUID is free and the act that takes it are one step. */
	pthread_mutex_t defs_lock;
	pthread_mutex_t lock;         /* guards what follows */
	struct lv_vm_setting {
		char name[65];
		uint64_t max_speed_mibs;      /* migrate-set-max-speed; 0 = none */
		uint64_t max_downtime_ms;     /* migrate-set-max-downtime; 0 = default */
		bool migrating;               /* a perform3 call of ours runs */
		uint64_t mig_started_ms;      /* its start, CLOCK_MONOTONIC */
		struct json_object *progress; /* its latest progress event, or NULL */
	} vms[256];
	unsigned int nr_vms;
};

/* The settings slot of VM @name, created if needed; caller holds srv->lock.
 * NULL if the table is full. */
struct lv_vm_setting *vmig__lv_setting_locked(struct lv_server *s, const char *name);

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
