/* The C side of src/image/jpeg.rs (see jpeg.c). */
#ifndef STIC_JPEG_H
#define STIC_JPEG_H

#include <stddef.h>

enum { STIC_JPEG_OK = 0, STIC_JPEG_TRUNCATED = 1, STIC_JPEG_CORRUPT = 2, STIC_JPEG_UNSUPPORTED = 3 };

/* Room for a message: libjpeg's JMSG_LENGTH_MAX. */
#define STIC_JPEG_MESSAGE_LEN 200

struct stic_jpeg_header {
  unsigned int width;
  unsigned int height;
  int components;
};

/* Reads the markers up to the first scan. On success the header says the size and the number of components
 * (1, 3 or 4) that stic_jpeg_decode writes per pixel. STIC_JPEG_TRUNCATED: the data end too soon (see jpeg.c);
 * STIC_JPEG_CORRUPT and STIC_JPEG_UNSUPPORTED: `message` says what is wrong. */
int stic_jpeg_read_header(const unsigned char *data, size_t len, struct stic_jpeg_header *header, char *message);

/* Decodes into `out`, width * height * components bytes, rows top to bottom. */
int stic_jpeg_decode(const unsigned char *data, size_t len, unsigned char *out, size_t out_len, char *message);

#endif
