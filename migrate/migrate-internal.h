/* Private cross-file declarations of migrate/. */
#ifndef VMIG_MIGRATE_INTERNAL_H
#define VMIG_MIGRATE_INTERNAL_H

#include <stdint.h>

#include "vmig/migrate.h"
#include "vmig/util.h"

struct json_object;
struct vmig_vm;

/* config.c: the CONFIG record's JSON. */
struct vmig__config {
	char name[65];
	unsigned int nr_vcpus;
	uint64_t mem_size;
	char workload[512];
	bool has_workload;
	bool running;            /* the VM ran on the source when it paused */
	bool resume;             /* run it on arrival even if it was paused */
	bool live;               /* the handoff protocol follows SWITCHOVER */
	unsigned int channels;   /* connections carrying pages, 1.. */
	uint64_t session;        /* identifies the extra connections */
};

struct json_object *vmig__config_build(struct vmig_vm *vm, bool running, bool resume,
				       bool live);
/* Check @o and fill @c; -EPROTO/-ENOTSUP with the reason in @err. */
int vmig__config_parse(struct json_object *o, struct vmig__config *c, struct vmig_err *err);
/* Can this host run it?  CPU features, sizes.  0 or -ENOTSUP with why. */
int vmig__config_check_host(struct json_object *o, struct vmig_err *err);

uint64_t vmig__now_ns(void);

#endif
