/*
 * /dev/kvm: opening it with errors an admin can act on, the capabilities
 * vmig cannot run without, and the host's supported CPUID.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "vmm-internal.h"

int vmig__kvm_open(int *fd_out, struct vmig_err *err)
{
	int fd, ret;

	fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		if (ret == -ENOENT)
			vmig_err_set(err, ret, "cannot open /dev/kvm: no such device "
				     "(is KVM enabled in the firmware and the kvm module loaded?)");
		else if (ret == -EACCES || ret == -EPERM)
			vmig_err_set(err, ret, "cannot open /dev/kvm: permission denied "
				     "(is the user in group kvm?)");
		else
			vmig_err_set(err, ret, "cannot open /dev/kvm: %s", strerror(-ret));
		return ret;
	}
	ret = ioctl(fd, KVM_GET_API_VERSION, 0);
	if (ret != KVM_API_VERSION) {
		vmig_err_set(err, -ENOTSUP, "/dev/kvm speaks API version %d, vmig needs %d",
			     ret, KVM_API_VERSION);
		close(fd);
		return -ENOTSUP;
	}
	*fd_out = fd;
	return 0;
}

int vmig__kvm_check_caps(int kvm_fd, struct vmig_err *err)
{
	static const struct { int cap; const char *name; } need[] = {
		{ KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY" },
		{ KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP" },
		{ KVM_CAP_PIT2, "KVM_CAP_PIT2" },
		{ KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT" },
		{ KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID" },
	};
	size_t i;

	for (i = 0; i < sizeof(need) / sizeof(need[0]); i++) {
		if (ioctl(kvm_fd, KVM_CHECK_EXTENSION, need[i].cap) <= 0) {
			vmig_err_set(err, -ENOTSUP, "this host's KVM lacks %s, which vmig needs",
				     need[i].name);
			return -ENOTSUP;
		}
	}
	return 0;
}

int vmig__kvm_supported_cpuid(int kvm_fd, struct kvm_cpuid2 **out)
{
	unsigned int nent;

	for (nent = 64; nent <= 4096; nent *= 2) {
		struct kvm_cpuid2 *c;

		c = calloc(1, sizeof(*c) + nent * sizeof(c->entries[0]));
		if (!c)
			return -ENOMEM;
		c->nent = nent;
		if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c) == 0) {
			*out = c;
			return 0;
		}
		free(c);
		if (errno != E2BIG)
			return -errno;
	}
	return -E2BIG;
}
