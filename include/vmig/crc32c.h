/*
 * CRC-32C (Castagnoli, polynomial 0x1EDC6F41, reflected), the checksum of
 * iSCSI, ext4 and SCTP, which x86 computes with the SSE4.2 crc32
 * instruction.  The migration stream checksums every record with it.
 */
#ifndef VMIG_CRC32C_H
#define VMIG_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/*
 * Extend @crc over @len bytes at @buf.  Start with 0; the running value can
 * be passed back in to continue over the next piece, so
 * vmig_crc32c(vmig_crc32c(0, a, n), b, m) equals the CRC of a and b
 * concatenated.  The pre- and post-inversion are done inside (zlib's
 * convention): vmig_crc32c(0, "123456789", 9) == 0xE3069283.
 *
 * Uses the crc32 instruction when the CPU has SSE4.2, a table otherwise.
 * Thread-safe (no state).
 */
uint32_t vmig_crc32c(uint32_t crc, const void *buf, size_t len);

/* The table-driven path alone, whatever the CPU (for the unit tests). */
uint32_t vmig__crc32c_sw(uint32_t crc, const void *buf, size_t len);

#endif /* VMIG_CRC32C_H */
