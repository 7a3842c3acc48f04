/*
 * 16550A UART at COM1 (0x3f8, ISA IRQ 4): transmit, receive, interrupts.
 *
 * Transmit is instantaneous: a byte written to THR goes straight to the
 * console fd (and to an attached console client, the "tap"), so THR is
 * always empty and LSR always says so.  Receive takes bytes from
 * vmig__serial_input() into a buffer larger than the 16550's 16-byte
 * FIFO (a paste is not lost to overruns); LSR.DR tells the guest there is
 * data.  Interrupts follow the 16550's priorities (received data, then THR
 * empty) and drive ISA IRQ 4 through KVM_IRQ_LINE: the line is high while
 * IIR reports an interrupt, so the in-kernel IOAPIC (edge) and PIC see a
 * rising edge exactly when a new interrupt condition appears.  The THRE
 * interrupt is the 16550's: pending when THR becomes empty (after a write,
 * or when the guest enables it), cleared by reading IIR or writing THR.
 * Loopback mode (MCR.LOOP) wires the modem lines back and THR to RBR, so a
 * driver's loopback probe passes.
 *
 * Threads: vCPU threads (port I/O) and whichever thread feeds input or
 * attaches a tap; everything is under s->lock, including KVM_IRQ_LINE, so
 * the line's level and the register state never disagree.
 */
#include "config.h"

#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "vmm-internal.h"

enum {
	UART_RBR_THR = 0, UART_IER = 1, UART_IIR_FCR = 2, UART_LCR = 3,
	UART_MCR = 4, UART_LSR = 5, UART_MSR = 6, UART_SCR = 7,
};

#define LCR_DLAB      0x80
#define LSR_DR        0x01
#define LSR_THRE      0x20
#define LSR_TEMT      0x40
#define IER_RDI       0x01
#define IER_THRI      0x02
#define IIR_NO_INT    0x01
#define IIR_THRI      0x02
#define IIR_RDI       0x04
#define IIR_FIFO      0xc0
#define FCR_ENABLE    0x01
#define FCR_CLEAR_RX  0x02
#define MCR_DTR       0x01
#define MCR_RTS       0x02
#define MCR_OUT1      0x04
#define MCR_OUT2      0x08
#define MCR_LOOP      0x10
#define MSR_CTS       0x10
#define MSR_DSR       0x20
#define MSR_RI        0x40
#define MSR_DCD       0x80

#define SERIAL_IRQ    4

void vmig__serial_init(struct vmig__serial *s, int out_fd)
{
	pthread_mutex_init(&s->lock, NULL);
	s->out_fd = out_fd;
	s->tap_fd = -1;
	s->vm_fd = -1;
	s->ier = s->mcr = s->scr = s->dlm = s->fcr = 0;
	s->lcr = 0x03;
	s->dll = 0x01;        /* 115200 baud */
	s->thr_ipending = false;
	s->irq_level = false;
	s->rx_head = s->rx_count = 0;
}

void vmig__serial_fini(struct vmig__serial *s)
{
	pthread_mutex_destroy(&s->lock);
}

void vmig__serial_set_irq(struct vmig__serial *s, int vm_fd)
{
	pthread_mutex_lock(&s->lock);
	s->vm_fd = vm_fd;
	pthread_mutex_unlock(&s->lock);
}

static uint8_t iir_locked(const struct vmig__serial *s)
{
	uint8_t fifo = (s->fcr & FCR_ENABLE) ? IIR_FIFO : 0;

	if ((s->ier & IER_RDI) && s->rx_count)
		return IIR_RDI | fifo;
	if ((s->ier & IER_THRI) && s->thr_ipending)
		return IIR_THRI | fifo;
	return IIR_NO_INT | fifo;
}

static void set_line(struct vmig__serial *s, bool level)
{
	struct kvm_irq_level irq = { .irq = SERIAL_IRQ, .level = level };

	s->irq_level = level;
	if (s->vm_fd >= 0 && ioctl(s->vm_fd, KVM_IRQ_LINE, &irq) < 0)
		vmig_log(VMIG_LOG_WARN, "serial: KVM_IRQ_LINE: %s", strerror(errno));
}

static void update_irq_locked(struct vmig__serial *s)
{
	bool level = !(iir_locked(s) & IIR_NO_INT);

	if (level != s->irq_level)
		set_line(s, level);
}

static void write_all(int fd, uint8_t c)
{
	ssize_t n;

	if (fd < 0)
		return;
	do {
		n = write(fd, &c, 1);
	} while (n < 0 && errno == EINTR);
	/* A closed or full console loses output, never the guest. */
}

static void rx_push_locked(struct vmig__serial *s, uint8_t c)
{
	if (s->rx_count == VMIG__SERIAL_RX_SIZE)
		return;                               /* overrun: the byte is lost */
	s->rx[(s->rx_head + s->rx_count) % VMIG__SERIAL_RX_SIZE] = c;
	s->rx_count++;
}

static void transmit_locked(struct vmig__serial *s, uint8_t c)
{
	if (s->mcr & MCR_LOOP) {
		rx_push_locked(s, c);
	} else {
		write_all(s->out_fd, c);
		write_all(s->tap_fd, c);
	}
	/* Sent at once: THR is empty again and says so. */
	s->thr_ipending = true;
}

static uint8_t msr_locked(const struct vmig__serial *s)
{
	uint8_t m = 0;

	if (!(s->mcr & MCR_LOOP))
		return MSR_DCD | MSR_DSR | MSR_CTS;
	if (s->mcr & MCR_DTR)
		m |= MSR_DSR;
	if (s->mcr & MCR_RTS)
		m |= MSR_CTS;
	if (s->mcr & MCR_OUT1)
		m |= MSR_RI;
	if (s->mcr & MCR_OUT2)
		m |= MSR_DCD;
	return m;
}

void vmig__serial_io(struct vmig__serial *s, unsigned int off, bool is_write,
		     uint8_t *data)
{
	bool dlab;

	pthread_mutex_lock(&s->lock);
	dlab = s->lcr & LCR_DLAB;
	if (is_write) {
		switch (off) {
		case UART_RBR_THR:
			if (dlab)
				s->dll = *data;
			else
				transmit_locked(s, *data);
			break;
		case UART_IER:
			if (dlab) {
				s->dlm = *data;
			} else {
				/* Enabling THRI while THR is empty raises it at once. */
				if ((*data & IER_THRI) && !(s->ier & IER_THRI))
					s->thr_ipending = true;
				s->ier = *data & 0x0f;
			}
			break;
		case UART_IIR_FCR:
			if (*data & FCR_CLEAR_RX)
				s->rx_head = s->rx_count = 0;
			s->fcr = *data & 0xc9;
			break;
		case UART_LCR:
			s->lcr = *data;
			break;
		case UART_MCR:
			s->mcr = *data & 0x1f;
			break;
		case UART_SCR:
			s->scr = *data;
			break;
		default:
			break;      /* LSR and MSR are read-only */
		}
	} else {
		switch (off) {
		case UART_RBR_THR:
			if (dlab) {
				*data = s->dll;
			} else if (s->rx_count) {
				*data = s->rx[s->rx_head];
				s->rx_head = (s->rx_head + 1) % VMIG__SERIAL_RX_SIZE;
				s->rx_count--;
			} else {
				*data = 0;
			}
			break;
		case UART_IER:
			*data = dlab ? s->dlm : s->ier;
			break;
		case UART_IIR_FCR:
			*data = iir_locked(s);
			/* Reading IIR that reports THRE acknowledges it. */
			if ((*data & 0x0f) == IIR_THRI)
				s->thr_ipending = false;
			break;
		case UART_LCR:
			*data = s->lcr;
			break;
		case UART_MCR:
			*data = s->mcr;
			break;
		case UART_LSR:
			*data = LSR_THRE | LSR_TEMT | (s->rx_count ? LSR_DR : 0);
			break;
		case UART_MSR:
			*data = msr_locked(s);
			break;
		case UART_SCR:
			*data = s->scr;
			break;
		default:
			*data = 0xff;
		}
	}
	update_irq_locked(s);
	pthread_mutex_unlock(&s->lock);
}

size_t vmig__serial_input(struct vmig__serial *s, const uint8_t *buf, size_t len)
{
	size_t n = 0;

	pthread_mutex_lock(&s->lock);
	/* With the UART in loopback, the outside world is disconnected. */
	if (!(s->mcr & MCR_LOOP))
		while (n < len && s->rx_count < VMIG__SERIAL_RX_SIZE)
			rx_push_locked(s, buf[n++]);
	update_irq_locked(s);
	pthread_mutex_unlock(&s->lock);
	return n;
}

int vmig__serial_set_tap(struct vmig__serial *s, int fd)
{
	int old;

	pthread_mutex_lock(&s->lock);
	old = s->tap_fd;
	s->tap_fd = fd;
	pthread_mutex_unlock(&s->lock);
	return old;
}

void vmig__serial_save(struct vmig__serial *s, struct vmig__serial_state *out,
		       struct vmig__serial_ext_state *ext)
{
	unsigned int i;

	pthread_mutex_lock(&s->lock);
	*out = (struct vmig__serial_state){ s->ier, s->lcr, s->mcr, s->scr, s->dll,
					    s->dlm, s->fcr, 0 };
	memset(ext, 0, sizeof(*ext));
	ext->thr_ipending = s->thr_ipending;
	ext->irq_level = s->irq_level;
	ext->rx_count = s->rx_count;
	for (i = 0; i < s->rx_count; i++)
		ext->rx[i] = s->rx[(s->rx_head + i) % VMIG__SERIAL_RX_SIZE];
	pthread_mutex_unlock(&s->lock);
}

void vmig__serial_load(struct vmig__serial *s, const struct vmig__serial_state *in,
		       const struct vmig__serial_ext_state *ext)
{
	pthread_mutex_lock(&s->lock);
	s->ier = in->ier & 0x0f;
	s->lcr = in->lcr;
	s->mcr = in->mcr & 0x1f;
	s->scr = in->scr;
	s->dll = in->dll;
	s->dlm = in->dlm;
	s->fcr = in->fcr;
	s->rx_head = 0;
	if (ext) {
		s->thr_ipending = ext->thr_ipending != 0;
		s->rx_count = ext->rx_count <= VMIG__SERIAL_RX_SIZE ? ext->rx_count : 0;
		memcpy(s->rx, ext->rx, s->rx_count);
	} else {
		/* An older source: a THRE interrupt the driver waits for is safe. */
		s->thr_ipending = true;
		s->rx_count = 0;
	}
	/*
	 * Drive the line to what the registers say.  KVM's irqchip state came
	 * from the source already (pending interrupts are in its IRR), but
	 * not who holds which line: a high line is raised again here; at
	 * worst the guest sees one extra interrupt it finds nothing in.
	 */
	set_line(s, !(iir_locked(s) & IIR_NO_INT));
	pthread_mutex_unlock(&s->lock);
}
