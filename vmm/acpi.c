/*
 * ACPI for Linux guests: the firmware tables, and the one ACPI device
 * vmig emulates, the PM1a event and control registers with the
 * fixed-feature power button.
 *
 * Tables (ACPI 2.0 layouts, which every 64-bit Linux reads), written once
 * at boot into the BIOS area, reserved in the e820 map:
 *   RSDP      "RSD PTR ", revision 2, found by the boot_params field
 *             acpi_rsdp_addr or by the kernel's scan of 0xe0000-0xfffff
 *   RSDT/XSDT the FADT and the MADT
 *   FADT      PM1a event block at 0x600 (4 bytes), PM1a control block at
 *             0x604 (2 bytes), no PM timer, no GPE blocks, no SMI command
 *             port (the machine is always in ACPI mode), SCI on IRQ 9;
 *             the power button is a fixed feature (flag PWR_BUTTON clear),
 *             there is no sleep button; the reset register is port 0xcf9
 *             with value 0x06 (platform.c resets on bit 2)
 *   FACS      required by the specification for a non-reduced machine
 *   DSDT      only Name (_S5, Package () { 5, 5, 0, 0 }): what ACPICA
 *             needs to put the machine in S5 (soft-off)
 *   MADT      one enabled LAPIC per vCPU (ID = vCPU id), the IOAPIC
 *             (ID = nr_vcpus, as in the MP table), GSI base 0, and one
 *             interrupt source override, SCI IRQ 9 level/high; ISA IRQ n
 *             is GSI n otherwise, as KVM's default routing and vmig's MP
 *             table have it (the PIT on IOAPIC pin 0); LINT1 is NMI
 * The MP table stays as well: a kernel without ACPI uses it, one with
 * ACPI ignores it once it finds the MADT.
 *
 * PM1: a guest power-off writes SLP_TYP = 5 (\_S5's value) with SLP_EN to
 * PM1a_CNT; vmig then stops the VM as powered off (exit code 0).  A reset
 * through the FADT's reset register reaches port 0xcf9.  SCI_EN reads as 1
 * always.  The one fixed event is the power button (vmig shutdown): a press
 * sets PWRBTN_STS (bit 8 of PM1_STS, 0x600; the guest clears it by writing
 * 1), and while PWRBTN_EN (bit 8 of PM1_EN, 0x602) is set too the SCI, ISA
 * IRQ 9, is held high through KVM_IRQ_LINE (level-triggered, active high,
 * as the MADT's override says).  Linux's ACPI button driver enables the
 * button, takes the SCI, clears the status and reports KEY_POWER to user
 * space, which decides (a distribution's logind powers off).  A guest that
 * never enabled the button (still booting, acpi=off, no driver) is not
 * pressed: vmig_vm_request_poweroff() says so instead.  The registers go
 * with the VM's state (section "acpi.pm"); a loaded VM raises the SCI again
 * if they say it is pending.
 *
 * Threads: the tables are written by the owner before any vCPU runs; the
 * PM1 registers are accessed from vCPU threads and the owner (the button)
 * under pm->lock, which also orders the SCI's KVM_IRQ_LINE calls.
 */
#include "config.h"

#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>

#include "vmm-internal.h"

#define PM1A_EVT_PORT        0x600u
#define PM1A_CNT_PORT        0x604u
#define PM1_PORTS_END        0x606u
#define SCI_IRQ              9u
#define RESET_PORT           0xcf9u
#define RESET_VALUE          0x06u
#define S5_SLP_TYP           5u

#define PM1_STS_PWRBTN       0x0100u  /* PWRBTN_STS, write 1 to clear */
#define PM1_EN_PWRBTN        0x0100u  /* PWRBTN_EN */
#define PM1_CNT_SCI_EN       0x0001u
#define PM1_CNT_SLP_TYP(v)   (((v) >> 10) & 7u)
#define PM1_CNT_SLP_EN       0x2000u

/* Offsets of the tables from the start of the area (all in 4 KiB). */
#define OFF_RSDP             0x000u
#define OFF_RSDT             0x040u
#define OFF_XSDT             0x080u
#define OFF_FADT             0x100u
#define OFF_FACS             0x200u   /* 64-byte aligned */
#define OFF_DSDT             0x240u
#define OFF_MADT             0x280u
#define FADT_LEN             244u     /* FADT revision 3 (ACPI 2.0) */
#define FACS_LEN             64u

static inline void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static uint8_t checksum(const uint8_t *p, size_t len)
{
	uint8_t sum = 0;

	while (len--)
		sum += *p++;
	return (uint8_t)-sum;
}

/* The 36-byte header every table but the RSDP and FACS starts with. */
static void header(uint8_t *t, const char sig[4], uint32_t len, uint8_t rev)
{
	memcpy(t, sig, 4);
	put32(t + 4, len);
	t[8] = rev;
	memcpy(t + 10, "VMIG  ", 6);               /* OEM ID */
	memcpy(t + 16, "VMIGKVM ", 8);             /* OEM table ID */
	put32(t + 24, 1);                          /* OEM revision */
	memcpy(t + 28, "VMIG", 4);                 /* creator ID */
	put32(t + 32, 1);                          /* creator revision */
}

static void finish(uint8_t *t)
{
	uint32_t len;

	memcpy(&len, t + 4, 4);
	t[9] = 0;
	t[9] = checksum(t, len);
}

/* A Generic Address Structure for @width bits of system I/O at @port. */
static void gas_io(uint8_t *g, uint8_t width, uint16_t port, uint8_t access)
{
	g[0] = 1;                                  /* system I/O space */
	g[1] = width;
	g[2] = 0;
	g[3] = access;                             /* 1 byte, 2 word, 3 dword */
	put64(g + 4, port);
}

static void write_fadt(uint8_t *f, uint32_t facs, uint32_t dsdt)
{
	header(f, "FACP", FADT_LEN, 3);
	put32(f + 36, facs);
	put32(f + 40, dsdt);
	f[45] = 0;                                 /* PM profile: unspecified */
	put16(f + 46, SCI_IRQ);
	put32(f + 48, 0);                          /* no SMI_CMD: always in ACPI mode */
	put32(f + 56, PM1A_EVT_PORT);
	put32(f + 64, PM1A_CNT_PORT);
	f[88] = 4;                                 /* PM1_EVT_LEN */
	f[89] = 2;                                 /* PM1_CNT_LEN */
	put16(f + 96, 101);                        /* P_LVL2_LAT > 100: no C2 */
	put16(f + 98, 1001);                       /* P_LVL3_LAT > 1000: no C3 */
	f[108] = 0x32;                             /* CMOS century register */
	/* IAPC_BOOT_ARCH: legacy devices (COM1, RTC); no 8042, no VGA, no MSI. */
	put16(f + 109, 0x0001 | 0x0004 | 0x0008);
	/*
	 * Flags: WBINVD works (0), C1 (HLT) on every vCPU (2), the power
	 * button is a fixed feature (PWR_BUTTON, 4, clear), no sleep button
	 * (SLP_BUTTON, 5: none as a fixed feature, none in the DSDT), the
	 * reset register is supported (10).
	 */
	put32(f + 112, (1u << 0) | (1u << 2) | (1u << 5) | (1u << 10));
	gas_io(f + 116, 8, RESET_PORT, 1);
	f[128] = RESET_VALUE;
	/* X_FIRMWARE_CTRL stays 0: the two FACS pointers exclude each other. */
	put64(f + 140, dsdt);                      /* X_DSDT */
	gas_io(f + 148, 32, PM1A_EVT_PORT, 2);     /* X_PM1a_EVT_BLK */
	gas_io(f + 172, 16, PM1A_CNT_PORT, 2);     /* X_PM1a_CNT_BLK */
	finish(f);
}

static uint32_t write_dsdt(uint8_t *d)
{
	/* DefinitionBlock body: Name (_S5, Package (4) { 5, 5, 0, 0 }) */
	static const uint8_t aml[] = {
		0x08, '_', 'S', '5', '_',              /* NameOp "_S5_" */
		0x12, 0x08, 0x04,                      /* PackageOp, PkgLength 8, 4 elements */
		0x0a, S5_SLP_TYP, 0x0a, S5_SLP_TYP,    /* BytePrefix 5 (SLP_TYPa, SLP_TYPb) */
		0x00, 0x00,                            /* Zero, Zero (reserved) */
	};
	uint32_t len = 36 + sizeof(aml);

	header(d, "DSDT", len, 2);
	memcpy(d + 36, aml, sizeof(aml));
	finish(d);
	return len;
}

static uint32_t write_madt(uint8_t *m, unsigned int nr_vcpus)
{
	uint8_t *p = m + 44;
	unsigned int i;

	put32(m + 36, VMIG__LAPIC_GPA);
	put32(m + 40, 1);                          /* PCAT_COMPAT: there are 8259s */
	for (i = 0; i < nr_vcpus; i++, p += 8) {
		p[0] = 0;                          /* processor local APIC */
		p[1] = 8;
		p[2] = (uint8_t)i;                 /* ACPI processor UID */
		p[3] = (uint8_t)i;                 /* APIC ID */
		put32(p + 4, 1);                   /* enabled */
	}
	p[0] = 1;                                  /* I/O APIC */
	p[1] = 12;
	p[2] = (uint8_t)nr_vcpus;
	p[3] = 0;
	put32(p + 4, VMIG__IOAPIC_GPA);
	put32(p + 8, 0);                           /* GSI base */
	p += 12;
	p[0] = 2;                                  /* interrupt source override */
	p[1] = 10;
	p[2] = 0;                                  /* ISA */
	p[3] = SCI_IRQ;
	put32(p + 4, SCI_IRQ);
	put16(p + 8, 0x000d);                      /* active high, level */
	p += 10;
	p[0] = 4;                                  /* local APIC NMI */
	p[1] = 6;
	p[2] = 0xff;                               /* all processors */
	put16(p + 3, 0);                           /* bus defaults */
	p[5] = 1;                                  /* LINT1 */
	p += 6;
	header(m, "APIC", (uint32_t)(p - m), 3);
	finish(m);
	return (uint32_t)(p - m);
}

size_t vmig__acpi_write(uint8_t *base, uint32_t gpa, unsigned int nr_vcpus)
{
	uint8_t *rsdp = base + OFF_RSDP, *rsdt = base + OFF_RSDT, *xsdt = base + OFF_XSDT;
	uint8_t *facs = base + OFF_FACS;
	uint32_t madt_len;

	memset(base, 0, VMIG__ACPI_SIZE);

	write_dsdt(base + OFF_DSDT);
	write_fadt(base + OFF_FADT, gpa + OFF_FACS, gpa + OFF_DSDT);
	madt_len = write_madt(base + OFF_MADT, nr_vcpus);

	memcpy(facs, "FACS", 4);
	put32(facs + 4, FACS_LEN);
	facs[32] = 1;                              /* version */

	header(rsdt, "RSDT", 36 + 2 * 4, 1);
	put32(rsdt + 36, gpa + OFF_FADT);
	put32(rsdt + 40, gpa + OFF_MADT);
	finish(rsdt);
	header(xsdt, "XSDT", 36 + 2 * 8, 1);
	put64(xsdt + 36, gpa + OFF_FADT);
	put64(xsdt + 44, gpa + OFF_MADT);
	finish(xsdt);

	memcpy(rsdp, "RSD PTR ", 8);
	memcpy(rsdp + 9, "VMIG  ", 6);
	rsdp[15] = 2;                              /* ACPI 2.0 or later */
	put32(rsdp + 16, gpa + OFF_RSDT);
	put32(rsdp + 20, 36);
	put64(rsdp + 24, gpa + OFF_XSDT);
	rsdp[8] = checksum(rsdp, 20);
	rsdp[32] = checksum(rsdp, 36);
	return OFF_MADT + madt_len;
}

/* ---- PM1a event and control registers ---- */

void vmig__acpi_pm_init(struct vmig__acpi_pm *pm)
{
	pthread_mutex_init(&pm->lock, NULL);
	pm->sts = pm->en = 0;
	pm->cnt = PM1_CNT_SCI_EN;
}

void vmig__acpi_pm_fini(struct vmig__acpi_pm *pm)
{
	pthread_mutex_destroy(&pm->lock);
}

/* The SCI's level the registers ask for: an enabled event with its status set. */
static bool sci_pending(const struct vmig__acpi_pm *pm)
{
	return (pm->sts & pm->en & PM1_STS_PWRBTN) != 0;
}

/* Drive the SCI (ISA IRQ 9, level) through the in-kernel irqchip; under pm->lock. */
static void set_sci(struct vmig_vm *vm, bool level)
{
	struct kvm_irq_level irq = { .irq = SCI_IRQ, .level = level };

	if (vm->vm_fd >= 0 && ioctl(vm->vm_fd, KVM_IRQ_LINE, &irq) < 0)
		vmig_log(VMIG_LOG_WARN, "acpi: KVM_IRQ_LINE %u: %s", SCI_IRQ, strerror(errno));
}

static uint16_t *pm_reg(struct vmig__acpi_pm *pm, unsigned int index)
{
	switch (index) {
	case 0: return &pm->sts;
	case 1: return &pm->en;
	default: return &pm->cnt;
	}
}

bool vmig__acpi_pm_io(struct vmig_vm *vm, uint16_t port, bool is_write, uint8_t *data,
		      unsigned int size)
{
	struct vmig__acpi_pm *pm = &vm->acpi_pm;
	unsigned int off, i;
	bool power_off = false, sci;

	if (port < PM1A_EVT_PORT || port >= PM1_PORTS_END)
		return false;
	off = port - PM1A_EVT_PORT;
	if (size > PM1_PORTS_END - port) {
		/* Past the block: reads float high, writes go nowhere. */
		if (!is_write)
			memset(data, 0xff, size);
		return true;
	}
	pthread_mutex_lock(&pm->lock);
	sci = sci_pending(pm);
	if (!is_write) {
		for (i = 0; i < size; i++) {
			uint16_t v = *pm_reg(pm, (off + i) / 2);

			data[i] = (uint8_t)(v >> (8 * ((off + i) % 2)));
		}
		goto out;
	}
	/* Each 16-bit register the access covers, with the bytes it writes. */
	for (i = 0; i < size; ) {
		unsigned int reg = (off + i) / 2;
		uint16_t val = 0, mask = 0;

		while (i < size && (off + i) / 2 == reg) {
			unsigned int shift = 8 * ((off + i) % 2);

			val |= (uint16_t)(data[i] << shift);
			mask |= (uint16_t)(0xff << shift);
			i++;
		}
		switch (reg) {
		case 0:                            /* PM1_STS: write 1 to clear */
			pm->sts &= (uint16_t)~(val & mask);
			break;
		case 1:                            /* PM1_EN */
			pm->en = (uint16_t)((pm->en & ~mask) | (val & mask));
			break;
		default:                           /* PM1_CNT */
			pm->cnt = (uint16_t)(((pm->cnt & ~mask) | (val & mask) | PM1_CNT_SCI_EN) &
					     ~PM1_CNT_SLP_EN);
			if ((val & mask & PM1_CNT_SLP_EN) &&
			    PM1_CNT_SLP_TYP(pm->cnt) == S5_SLP_TYP)
				power_off = true;
			break;
		}
	}
	if (sci_pending(pm) != sci)
		set_sci(vm, !sci);
out:
	pthread_mutex_unlock(&pm->lock);
	if (power_off)
		vmig__vm_stop_self(vm, 0, "the guest powered off (ACPI S5)");
	return true;
}

void vmig__acpi_pm_save(struct vmig__acpi_pm *pm, struct vmig__acpi_pm_state *out)
{
	pthread_mutex_lock(&pm->lock);
	*out = (struct vmig__acpi_pm_state){ pm->sts, pm->en, pm->cnt, 0 };
	pthread_mutex_unlock(&pm->lock);
}

void vmig__acpi_pm_load(struct vmig_vm *vm, const struct vmig__acpi_pm_state *in)
{
	struct vmig__acpi_pm *pm = &vm->acpi_pm;

	pthread_mutex_lock(&pm->lock);
	pm->sts = in->sts;
	pm->en = in->en;
	pm->cnt = (uint16_t)((in->cnt | PM1_CNT_SCI_EN) & ~PM1_CNT_SLP_EN);
	/*
	 * A press the guest had not taken yet: hold the SCI high again.  The
	 * irqchip's state came with the VM, but not who holds which line (as
	 * for the UART); a fresh VM's line is low, so nothing to do otherwise.
	 */
	if (sci_pending(pm))
		set_sci(vm, true);
	pthread_mutex_unlock(&pm->lock);
}

/* ---- the power button, and vmig shutdown ---- */

int vmig__acpi_power_button(struct vmig_vm *vm)
{
	struct vmig__acpi_pm *pm = &vm->acpi_pm;
	bool sci;

	pthread_mutex_lock(&pm->lock);
	if (!(pm->en & PM1_EN_PWRBTN)) {
		pthread_mutex_unlock(&pm->lock);
		return -EAGAIN;
	}
	sci = sci_pending(pm);
	pm->sts |= PM1_STS_PWRBTN;
	if (!sci)
		set_sci(vm, true);
	pthread_mutex_unlock(&pm->lock);
	return 0;
}

int vmig_vm_request_poweroff(struct vmig_vm *vm, struct vmig_err *err)
{
	int ret;

	if (!vm->boot.kernel && !vm->kernel) {
		ret = vmig_guest_request_shutdown(vm);
		if (ret)
			vmig_err_set(err, -EAGAIN, "the built-in guest has not set up its "
				     "status page yet (it is still booting)");
		return ret ? -EAGAIN : 0;
	}
	ret = vmig__acpi_power_button(vm);
	if (ret)
		vmig_err_set(err, ret, "the guest has not enabled its ACPI power button "
			     "(a kernel still booting, booted with acpi=off, or without "
			     "the ACPI button driver)");
	return ret;
}
