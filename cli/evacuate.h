/*
 * vmig evacuate and vmig host-info: what their files share
 * (cli/cmd-host-info.c, cli/evacuate-plan.c, cli/cmd-evacuate.c).
 */
#ifndef VMIG_CLI_EVACUATE_H
#define VMIG_CLI_EVACUATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "vmig/transport.h"

struct json_object;

/* ---- cmd-host-info.c ---- */

/* The drain mark's file name in the run directory. */
#define EVAC_DRAIN_FILE "drain"

/*
 * Set the drain mark (RUN_DIR/drain, JSON: since, pid, by, reason),
 * replacing one that is there.  *created says whether there was none
 * before (so that a refused evacuation can take back only its own).
 * 0 or -errno, error printed.
 */
int evac_drain_set(const char *by, const char *reason, bool *created);
/* Remove the drain mark; 0 also if there was none; -errno, error printed. */
int evac_drain_clear(void);

/*
 * The VMs that run here: a new JSON array of their status objects (as
 * `vmig status --json`), sorted by name; stale sockets are skipped.
 * 0 or -errno, error printed.
 */
int evac_local_vms(struct json_object **out);

/*
 * What `vmig host-info --json` prints: a new object.  NULL on failure
 * (error printed).
 */
struct json_object *evac_host_info(void);

/* ---- evacuate-plan.c ---- */

struct evac_target {
	char uri[512];             /* ssh://[USER@]HOST[:PORT] */
	char label[300];           /* HOST[:PORT], for tables */
	struct json_object *info;  /* its host-info, or NULL */
	char error[1024];          /* why it cannot be used ("" if it can) */
	uint64_t free_bytes;       /* as it said */
	uint64_t planned_bytes;    /* memory of the VMs placed on it */
	unsigned int planned_vms;
};

struct evac_vm {
	char name[80];
	uint64_t memory;
	unsigned int vcpus;
	char state[32];
	int target;                /* index in the targets, -1 = none */
	unsigned int order;        /* position in the run order */
};

struct evac_plan {
	struct evac_target *targets;
	unsigned int nr_targets;
	struct evac_vm *vms;       /* in run order */
	unsigned int nr_vms;
	struct json_object *self;  /* this host's host-info */
};

/*
 * Parse "--to HOST[,HOST...]" (HOST: [ssh://][USER@]NAME[:PORT]) into
 * plan->targets.  Usage error printed; returns VMIG_EXIT_USAGE or 0.
 */
int evac_parse_targets(const char *list, struct evac_plan *plan);

/*
 * Ask every target for its host-info over SSH (concurrently, each within
 * @timeout_ms); a target that does not answer gets its error set.
 */
void evac_query_targets(struct evac_plan *plan, const struct vmig_ssh_options *ssh,
			int timeout_ms);

/*
 * Place every VM of plan->vms on a usable target: by size, largest
 * first, each on the target with most memory left that fits it (spread)
 * or, failing that, with least left that fits (pack).  A target is
 * unusable if it did not answer, is drained, lacks CPU features this host
 * offers its guests, or already runs a VM of the same name.  Returns 0 if
 * every VM has a target; else -ENOSPC with why (one line per VM that does
 * not fit, and each target's state) in @why.
 */
int evac_place(struct evac_plan *plan, char *why, size_t len);

/* Print the plan as a table (stdout). */
void evac_plan_print(const struct evac_plan *plan, FILE *f);
/* The plan as JSON (a new object). */
struct json_object *evac_plan_json(const struct evac_plan *plan);

void evac_plan_fini(struct evac_plan *plan);

#endif
