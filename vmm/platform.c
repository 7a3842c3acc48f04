/*
 * The small PC devices a Linux guest touches besides the UART: the CMOS
 * real-time clock and NVRAM (ports 0x70/0x71), the i8042 keyboard
 * controller just far enough for its reset line (reboot=k), and the reset
 * control register at 0xcf9 (reboot=pci, and the ACPI reset register).
 * The ACPI PM1 registers are acpi.c's.  The PIC, PIT, IOAPIC and LAPIC
 * are KVM's, in the kernel.
 *
 * The RTC has no ticking state of its own: it reads the host's clock
 * (UTC) plus an offset the guest sets by writing the time registers, so it
 * is right after a migration between hosts whose clocks agree.  Linux on
 * KVM reads the time from kvmclock anyway; the RTC serves the boot-time
 * fallback and hwclock.
 *
 * Threads: vCPU threads; the CMOS is under its own lock.
 */
#include "config.h"

#include <string.h>
#include <time.h>

#include "vmm-internal.h"

enum {
	RTC_SECONDS = 0x00, RTC_MINUTES = 0x02, RTC_HOURS = 0x04, RTC_DAY_OF_WEEK = 0x06,
	RTC_DAY = 0x07, RTC_MONTH = 0x08, RTC_YEAR = 0x09, RTC_REG_A = 0x0a,
	RTC_REG_B = 0x0b, RTC_REG_C = 0x0c, RTC_REG_D = 0x0d, RTC_CENTURY = 0x32,
};

#define REG_B_24H    0x02
#define REG_B_BINARY 0x04
#define REG_B_SET    0x80

void vmig__cmos_init(struct vmig__cmos *c, uint64_t low_mem, uint64_t high_mem)
{
	uint64_t ext;

	pthread_mutex_init(&c->lock, NULL);
	c->index = 0;
	c->offset_s = 0;
	memset(c->ram, 0, sizeof(c->ram));
	c->ram[RTC_REG_A] = 0x26;                 /* 32.768 kHz, 1024 Hz */
	c->ram[RTC_REG_B] = REG_B_24H;            /* BCD, 24-hour */
	c->ram[RTC_REG_D] = 0x80;                 /* battery good */
	/* Memory sizes, as a PC BIOS leaves them. */
	c->ram[0x15] = 0x80;                      /* 640 KiB base */
	c->ram[0x16] = 0x02;
	ext = low_mem > (1ull << 20) ? (low_mem - (1ull << 20)) >> 10 : 0;
	if (ext > 0xffff)
		ext = 0xffff;
	c->ram[0x17] = c->ram[0x30] = (uint8_t)ext;
	c->ram[0x18] = c->ram[0x31] = (uint8_t)(ext >> 8);
	ext = low_mem > (16ull << 20) ? (low_mem - (16ull << 20)) >> 16 : 0;
	if (ext > 0xffff)
		ext = 0xffff;
	c->ram[0x34] = (uint8_t)ext;
	c->ram[0x35] = (uint8_t)(ext >> 8);
	ext = high_mem >> 16;
	c->ram[0x5b] = (uint8_t)ext;
	c->ram[0x5c] = (uint8_t)(ext >> 8);
	c->ram[0x5d] = (uint8_t)(ext >> 16);
}

void vmig__cmos_fini(struct vmig__cmos *c)
{
	pthread_mutex_destroy(&c->lock);
}

static uint8_t to_reg(const struct vmig__cmos *c, int v)
{
	if (c->ram[RTC_REG_B] & REG_B_BINARY)
		return (uint8_t)v;
	return (uint8_t)(((v / 10) << 4) | (v % 10));
}

static int from_reg(const struct vmig__cmos *c, uint8_t v)
{
	if (c->ram[RTC_REG_B] & REG_B_BINARY)
		return v;
	return (v >> 4) * 10 + (v & 0x0f);
}

static void guest_tm(const struct vmig__cmos *c, struct tm *tm)
{
	time_t t = time(NULL) + (time_t)c->offset_s;

	gmtime_r(&t, tm);
}

static uint8_t read_time_reg(const struct vmig__cmos *c, uint8_t reg)
{
	struct tm tm;
	int hour;

	guest_tm(c, &tm);
	switch (reg) {
	case RTC_SECONDS: return to_reg(c, tm.tm_sec);
	case RTC_MINUTES: return to_reg(c, tm.tm_min);
	case RTC_HOURS:
		if (c->ram[RTC_REG_B] & REG_B_24H)
			return to_reg(c, tm.tm_hour);
		hour = tm.tm_hour % 12 ? tm.tm_hour % 12 : 12;
		return to_reg(c, hour) | (tm.tm_hour >= 12 ? 0x80 : 0);
	case RTC_DAY_OF_WEEK: return to_reg(c, tm.tm_wday + 1);
	case RTC_DAY: return to_reg(c, tm.tm_mday);
	case RTC_MONTH: return to_reg(c, tm.tm_mon + 1);
	case RTC_YEAR: return to_reg(c, tm.tm_year % 100);
	case RTC_CENTURY: return to_reg(c, 19 + tm.tm_year / 100);
	}
	return 0;
}

/* The guest set one time register: move the offset so it reads back. */
static void write_time_reg(struct vmig__cmos *c, uint8_t reg, uint8_t v)
{
	struct tm tm;
	time_t want;

	guest_tm(c, &tm);
	switch (reg) {
	case RTC_SECONDS: tm.tm_sec = from_reg(c, v); break;
	case RTC_MINUTES: tm.tm_min = from_reg(c, v); break;
	case RTC_HOURS:
		if (c->ram[RTC_REG_B] & REG_B_24H)
			tm.tm_hour = from_reg(c, v);
		else
			tm.tm_hour = from_reg(c, v & 0x7f) % 12 + ((v & 0x80) ? 12 : 0);
		break;
	case RTC_DAY: tm.tm_mday = from_reg(c, v); break;
	case RTC_MONTH: tm.tm_mon = from_reg(c, v) - 1; break;
	case RTC_YEAR: tm.tm_year = (tm.tm_year / 100) * 100 + from_reg(c, v); break;
	case RTC_CENTURY: tm.tm_year = (from_reg(c, v) - 19) * 100 + tm.tm_year % 100; break;
	default: return;
	}
	want = timegm(&tm);
	if (want != (time_t)-1)
		c->offset_s = (int64_t)want - (int64_t)time(NULL);
}

static bool is_time_reg(uint8_t reg)
{
	return reg <= RTC_YEAR || reg == RTC_CENTURY;
}

void vmig__cmos_io(struct vmig__cmos *c, unsigned int off, bool is_write, uint8_t *data)
{
	uint8_t reg;

	pthread_mutex_lock(&c->lock);
	if (off == 0) {
		if (is_write)
			c->index = *data;             /* bit 7 masks NMIs: ignored */
		else
			*data = 0xff;
		goto out;
	}
	reg = c->index & 0x7f;
	if (is_write) {
		if (reg == RTC_REG_C || reg == RTC_REG_D)
			goto out;                     /* read-only */
		if (reg == RTC_REG_A)
			c->ram[reg] = *data & 0x7f;   /* UIP is read-only */
		else if (is_time_reg(reg) && (reg & 1) && reg < RTC_DAY_OF_WEEK)
			c->ram[reg] = *data;          /* alarm registers */
		else if (is_time_reg(reg))
			write_time_reg(c, reg, *data);
		else
			c->ram[reg] = *data;
	} else if (is_time_reg(reg) && !((reg & 1) && reg < RTC_DAY_OF_WEEK)) {
		*data = read_time_reg(c, reg);
	} else if (reg == RTC_REG_C) {
		*data = c->ram[reg];
		c->ram[reg] = 0;                      /* reading clears the flags */
	} else {
		*data = c->ram[reg];
	}
out:
	pthread_mutex_unlock(&c->lock);
}

void vmig__cmos_save(struct vmig__cmos *c, struct vmig__cmos_state *out)
{
	pthread_mutex_lock(&c->lock);
	memset(out, 0, sizeof(*out));
	out->index = c->index;
	out->offset_s = c->offset_s;
	memcpy(out->ram, c->ram, sizeof(out->ram));
	pthread_mutex_unlock(&c->lock);
}

void vmig__cmos_load(struct vmig__cmos *c, const struct vmig__cmos_state *in)
{
	pthread_mutex_lock(&c->lock);
	c->index = in->index;
	c->offset_s = in->offset_s;
	memcpy(c->ram, in->ram, sizeof(c->ram));
	pthread_mutex_unlock(&c->lock);
}

static void request_reset(struct vmig_vm *vm, const char *how)
{
	pthread_mutex_lock(&vm->lock);
	if (!vm->stop_reason[0])
		vm->reboot = true;
	pthread_mutex_unlock(&vm->lock);
	vmig__vm_stop_self(vm, 0, "the guest rebooted (%s)", how);
}

bool vmig__platform_io(struct vmig_vm *vm, uint16_t port, bool is_write, uint8_t *data,
		       unsigned int size)
{
	if (vmig__acpi_pm_io(vm, port, is_write, data, size))
		return true;
	switch (port) {
	case 0x70:
	case 0x71:
		if (size != 1)
			return false;
		vmig__cmos_io(&vm->cmos, port - 0x70, is_write, data);
		return true;
	case 0x60:
		if (!is_write)
			data[0] = 0;
		return true;
	case 0x64:
		/* Status: both buffers empty, self-test passed.  Command 0xfe
		 * pulses the CPU reset line. */
		if (!is_write)
			data[0] = 0x1c;
		else if (data[0] == 0xfe)
			request_reset(vm, "keyboard controller reset");
		return true;
	case 0xcf9:
		if (size != 1)
			return false;
		if (!is_write)
			data[0] = 0;
		else if (data[0] & 0x04)
			request_reset(vm, "reset control register");
		return true;
	}
	return false;
}
