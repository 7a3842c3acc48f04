/*
 * vmig libvirt-serve: serve libvirt's RPC protocol for the VMs of the run
 * directory, so that virsh and libvirt clients drive them (libvirt/).
 */
#include "config.h"

#include <getopt.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "vmig/util.h"
#include "cli.h"
#include "../libvirt/lv-serve.h"

enum {
	OPT_REMOTE_VMIG = 256,
	OPT_KNOWN_HOSTS,
	OPT_ACCEPT_NEW,
	OPT_CONFIG_DIR,
};

int cmd_libvirt_serve(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "socket",       required_argument, NULL, 's' },
		{ "remote-vmig",  required_argument, NULL, OPT_REMOTE_VMIG },
		{ "known-hosts",  required_argument, NULL, OPT_KNOWN_HOSTS },
		{ "identity",     required_argument, NULL, 'i' },
		{ "accept-new-host-key", no_argument, NULL, OPT_ACCEPT_NEW },
		{ "config-dir",   required_argument, NULL, OPT_CONFIG_DIR },
		{ "help",         no_argument,       NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct vmig_libvirt_options o = { 0 };
	int c;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":s:i:h", longopts, NULL)) != -1) {
		switch (c) {
		case 's':
			o.socket_path = optarg;
			break;
		case OPT_REMOTE_VMIG:
			if (!*optarg)
				return cli_usage_error("libvirt-serve", "--remote-vmig needs a command");
			o.remote_vmig = optarg;
			break;
		case OPT_KNOWN_HOSTS:
			if (optarg[0] != '/')
				return cli_usage_error("libvirt-serve", "--known-hosts needs an "
						       "absolute path");
			o.known_hosts = optarg;
			break;
		case 'i':
			if (optarg[0] != '/' || access(optarg, R_OK) < 0)
				return cli_usage_error("libvirt-serve", "--identity needs the absolute "
						       "path of a readable private key");
			o.identity = optarg;
			break;
		case OPT_ACCEPT_NEW:
			o.accept_new_host_key = true;
			break;
		case OPT_CONFIG_DIR:
			if (optarg[0] != '/')
				return cli_usage_error("libvirt-serve", "--config-dir needs an "
						       "absolute path");
			o.config_dir = optarg;
			break;
		case 'h':
			printf("Usage: vmig libvirt-serve [--socket PATH] [--config-dir DIR]\n"
			       "                          [--remote-vmig CMD] [--known-hosts FILE]\n"
			       "                          [--identity FILE] [--accept-new-host-key]\n\n"
			       "Serve libvirt's RPC protocol for the VMs of the run directory, so that\n"
			       "virsh and libvirt clients list, control and migrate them:\n"
			       "  virsh -c 'vmig+unix:///system?socket=PATH' list\n"
			       "Runs until SIGINT or SIGTERM; also started by systemd with a socket\n"
			       "(LISTEN_FDS).  See vmig-libvirt(1).\n\n"
			       "  -s, --socket PATH      listen here (default RUN_DIR/libvirt-sock)\n"
			       "      --config-dir DIR   keep domain definitions (virsh define) here\n"
			       "                         (default /var/lib/vmig/libvirt/domains for root,\n"
			       "                         else $XDG_CONFIG_HOME/vmig/libvirt/domains)\n"
			       "Peer-to-peer migrations (virsh migrate --p2p) go over SSH:\n"
			       "      --remote-vmig CMD  run CMD instead of 'vmig' on the destination\n"
			       "      --known-hosts FILE check destinations' host keys in FILE\n"
			       "  -i, --identity FILE    log in with this private key\n"
			       "      --accept-new-host-key  record the key of a host not yet known\n");
			return VMIG_EXIT_OK;
		case ':':
			return cli_usage_error("libvirt-serve", "option '%s' needs a value",
					       argv[optind - 1]);
		default:
			return cli_usage_error("libvirt-serve", "unknown option '%s'", argv[optind - 1]);
		}
	}
	if (optind != argc)
		return cli_usage_error("libvirt-serve", "too many arguments");
	return vmig_libvirt_serve(&o);
}
