/* JPEG decoding through libjpeg-turbo's libjpeg API, set up the way Pillow's JpegDecode.c sets it up, so that
 * the samples are the ones `PIL.Image.open(path)` produces:
 *   - the library's defaults otherwise (accurate integer IDCT, fancy upsampling, block smoothing of progressive
 *     scans, colour space detected from the JFIF/Adobe markers and component ids);
 *   - output L for 1 component, RGB for 3, CMYK for 4 (the caller inverts CMYK as Pillow's "CMYK;I" does);
 *   - warnings are ignored;
 *   - the data are given all at once to a suspending source: where the decoder asks for more before the last
 *     scanline is out, Pillow's reader finds the end of the file and fails ("image file is truncated"); running
 *     out while looking for the end-of-image marker after the last scanline is not an error.
 */
#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <jerror.h>
#include <jpeglib.h>

#include "jpeg.h"

struct error_manager {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
};

static void error_exit(j_common_ptr cinfo) {
  struct error_manager *err = (struct error_manager *)cinfo->err;
  longjmp(err->jump, 1);
}

static void ignore_message(j_common_ptr cinfo) { (void)cinfo; }

static void init_source(j_decompress_ptr cinfo) { (void)cinfo; }

/* Everything was in the buffer from the start: there is never more to read. */
static boolean suspend(j_decompress_ptr cinfo) {
  (void)cinfo;
  return FALSE;
}

static void skip_input_data(j_decompress_ptr cinfo, long count) {
  struct jpeg_source_mgr *src = cinfo->src;
  if (count <= 0) return;
  if ((size_t)count > src->bytes_in_buffer) count = (long)src->bytes_in_buffer;
  src->next_input_byte += count;
  src->bytes_in_buffer -= (size_t)count;
}

static void term_source(j_decompress_ptr cinfo) { (void)cinfo; }

struct decoder {
  struct jpeg_decompress_struct cinfo;
  struct error_manager err;
  struct jpeg_source_mgr src;
};

static void set_message(struct decoder *d, char *message) {
  (*d->cinfo.err->format_message)((j_common_ptr)&d->cinfo, message);
}

static int read_header(struct decoder *d, const unsigned char *data, size_t len, struct stic_jpeg_header *header,
                       char *message) {
  int status;
  d->src.next_input_byte = data;
  d->src.bytes_in_buffer = len;
  d->src.init_source = init_source;
  d->src.fill_input_buffer = suspend;
  d->src.skip_input_data = skip_input_data;
  d->src.resync_to_restart = jpeg_resync_to_restart;
  d->src.term_source = term_source;
  d->cinfo.src = &d->src;
  do {
    status = jpeg_read_header(&d->cinfo, FALSE);
  } while (status == JPEG_HEADER_TABLES_ONLY);
  if (status == JPEG_SUSPENDED) return STIC_JPEG_TRUNCATED;
  header->width = d->cinfo.image_width;
  header->height = d->cinfo.image_height;
  header->components = d->cinfo.num_components;
  if (d->cinfo.data_precision != 8) {
    snprintf(message, JMSG_LENGTH_MAX, "%d-bit samples (only 8-bit JPEGs are read)", d->cinfo.data_precision);
    return STIC_JPEG_UNSUPPORTED;
  }
  switch (d->cinfo.num_components) {
    case 1: d->cinfo.out_color_space = JCS_GRAYSCALE; break;
    case 3: d->cinfo.out_color_space = JCS_RGB; break;
    case 4: d->cinfo.out_color_space = JCS_CMYK; break;
    default:
      snprintf(message, JMSG_LENGTH_MAX, "%d components (1, 3 or 4 are read)", d->cinfo.num_components);
      return STIC_JPEG_UNSUPPORTED;
  }
  return STIC_JPEG_OK;
}

/* Reads the header and, given somewhere to write them, the samples. */
static int run(const unsigned char *data, size_t len, struct stic_jpeg_header *header, unsigned char *out,
               size_t out_len, char *message) {
  struct decoder d;
  int status;
  size_t row_len;
  d.cinfo.err = jpeg_std_error(&d.err.pub);
  d.err.pub.error_exit = error_exit;
  d.err.pub.output_message = ignore_message;
  jpeg_create_decompress(&d.cinfo);
  if (setjmp(d.err.jump)) {
    set_message(&d, message);
    jpeg_destroy_decompress(&d.cinfo);
    return STIC_JPEG_CORRUPT;
  }
  status = read_header(&d, data, len, header, message);
  if (status != STIC_JPEG_OK || out == NULL) goto done;
  row_len = (size_t)header->width * (size_t)header->components;
  if (out_len != row_len * header->height) {
    strcpy(message, "output buffer of the wrong size");
    status = STIC_JPEG_CORRUPT;
    goto done;
  }
  if (!jpeg_start_decompress(&d.cinfo)) {
    status = STIC_JPEG_TRUNCATED;
    goto done;
  }
  while (d.cinfo.output_scanline < d.cinfo.output_height) {
    JSAMPROW row = out + (size_t)d.cinfo.output_scanline * row_len;
    if (jpeg_read_scanlines(&d.cinfo, &row, 1) != 1) {
      status = STIC_JPEG_TRUNCATED;
      goto done;
    }
  }
  jpeg_finish_decompress(&d.cinfo);
done:
  jpeg_destroy_decompress(&d.cinfo);
  return status;
}

int stic_jpeg_read_header(const unsigned char *data, size_t len, struct stic_jpeg_header *header, char *message) {
  return run(data, len, header, NULL, 0, message);
}

int stic_jpeg_decode(const unsigned char *data, size_t len, unsigned char *out, size_t out_len, char *message) {
  struct stic_jpeg_header header;
  return run(data, len, &header, out, out_len, message);
}
