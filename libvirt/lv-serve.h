/*
 * vmig's libvirt endpoint: what the command line starts (libvirt/server.c).
 * The rest of libvirt/ is private to it (libvirt-internal.h).
 */
#ifndef VMIG_LV_SERVE_H
#define VMIG_LV_SERVE_H

#include <stdbool.h>

/* Options of `vmig libvirt-serve`; the strings must outlive the call. */
struct vmig_libvirt_options {
	const char *socket_path;      /* NULL: RUN_DIR/libvirt-sock */
	const char *remote_vmig;      /* ssh: the vmig to run on destinations */
	const char *known_hosts;      /* absolute, or NULL */
	const char *identity;         /* absolute, or NULL */
	const char *config_dir;       /* definitions; NULL: the default */
	bool accept_new_host_key;
};

/*
 * Serve libvirt's protocol for the VMs of the run directory on the socket
 * systemd passed (LISTEN_FDS) or on o->socket_path, until SIGINT or
 * SIGTERM.  Runs on the process's main thread; blocks those signals in
 * every thread.  Returns the process exit code; errors are printed.
 */
int vmig_libvirt_serve(const struct vmig_libvirt_options *o);

#endif
