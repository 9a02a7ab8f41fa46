/* Direct windows of JPEG-tiled TIFF levels (vipsnorm.io.jpeg_tiles), with libjpeg-turbo.
 *
 * A random 256 px window of a slide with 256 px tiles meets four tiles, and libvips decodes all of each
 * (as OpenSlide does). Here only the window's pixels are made: rows outside it are skipped
 * (jpeg_skip_scanlines: entropy decoding only, no inverse DCT or colour conversion), and columns
 * outside it cropped (jpeg_crop_scanline). The bytes are those of a full decode, hence of libvips'
 * (the Python side checks that on every level before using it): skipping is exact, and cropping is
 * exact once a margin of one iMCU is kept on either side when chroma is subsampled (fancy upsampling
 * reads a neighbour there; measured: without the margin, 4:2:0 tiles differ by up to 6 levels in the
 * cropped window's edge columns).
 *
 * Damage: every libjpeg warning is taken as a failure, as libvips' reader takes them when failing on
 * warnings, and a tile cut short (which libjpeg fills with grey), garbled or missing gives a negative
 * return; the caller then reads the window through libvips, which reports the damage. A garbled tile
 * can decode to wrong pixels with no warning until further down its data, so the first time a tile
 * is read its data are decoded to the end (rows below the window skipped, entropy decoding only) and
 * its end checked; the caller's `valid` byte for the tile then records it, and later windows stop
 * after their last row. Each tile starts from the level's JPEGTables (TIFF Technical Note 2: the
 * default for a tile that carries no tables of its own; a tile that does must not change the next).
 *
 * A reader may also keep tiles it decoded, as their coefficients, for later windows (see "Tiles kept as
 * coefficients" below).
 *
 * Nothing here calls Python: ctypes releases the GIL around vj_window, and several threads may call
 * it at once.
 *
 * Built as an optional extension when jpeglib.h (libjpeg-turbo 1.5 or later) is present.
 */

#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jpeglib.h>

#define VJ_VERSION 7

#define VJ_OK 0
#define VJ_JPEG (-1)   /* libjpeg error or warning */
#define VJ_READ (-2)   /* the tile's bytes could not be read */
#define VJ_SHAPE (-3)  /* a tile is not what the directory says (size, components) or the window is outside */
#define VJ_MEMORY (-4)

/* The largest tile accepted, in bytes of JPEG data (a 4096 px tile of noise is about 50 MB). */
#define VJ_MAX_TILE_BYTES ((uint64_t)1 << 28)

/* Rows decoded a call (libjpeg-turbo then converts colours a row group at a time). */
#define VJ_ROWS 16

struct vj_error {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
};

static void vj_error_exit(j_common_ptr cinfo)
{
    longjmp(((struct vj_error *)cinfo->err)->jump, 1);
}

static void vj_emit_message(j_common_ptr cinfo, int level)
{
    if (level < 0) /* a warning: the data are damaged (libjpeg goes on, filling in grey) */
        longjmp(((struct vj_error *)cinfo->err)->jump, 1);
}

static void vj_output_message(j_common_ptr cinfo)
{
    (void)cinfo; /* never printed: the caller reports what libvips says of the tile */
}

/* err's manager, set up as above: every warning and error jumps to err->jump. */
static struct jpeg_error_mgr *vj_errors(struct vj_error *err)
{
    struct jpeg_error_mgr *pub = jpeg_std_error(&err->pub);
    pub->error_exit = vj_error_exit;
    pub->emit_message = vj_emit_message;
    pub->output_message = vj_output_message;
    return pub;
}

int vj_version(void) { return VJ_VERSION; }

/* Read count bytes at offset of fd into buf (pread: no shared file position between threads). */
static int vj_pread(int fd, unsigned char *buf, uint64_t count, uint64_t offset)
{
    uint64_t done = 0;
    while (done < count) {
        ssize_t got = pread(fd, buf + done, (size_t)(count - done), (off_t)(offset + done));
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        done += (uint64_t)got;
    }
    return 0;
}

/* The level's tables (tables_len bytes, may be none), then the header of the tile's len bytes at data,
 * read into cinfo and checked against the level (three components, tile_w x tile_h), its colours set
 * to be read as libvips reads TIFF JPEG tiles (the photometric interpretation says what the components
 * are). Returns VJ_OK, VJ_JPEG or VJ_SHAPE; libjpeg errors jump to the caller's setjmp. */
static int vj_header(j_decompress_ptr cinfo, const unsigned char *tables, uint64_t tables_len,
                     const unsigned char *data, uint64_t len, int rgb, int tile_w, int tile_h)
{
    if (tables_len > 0) {
        jpeg_mem_src(cinfo, tables, (unsigned long)tables_len);
        if (jpeg_read_header(cinfo, FALSE) != JPEG_HEADER_TABLES_ONLY)
            return VJ_JPEG;
    }
    jpeg_mem_src(cinfo, data, (unsigned long)len);
    if (jpeg_read_header(cinfo, TRUE) != JPEG_HEADER_OK)
        return VJ_JPEG;
    if (cinfo->num_components != 3 || (int)cinfo->image_width != tile_w || (int)cinfo->image_height != tile_h)
        return VJ_SHAPE;
    cinfo->jpeg_color_space = rgb ? JCS_RGB : JCS_YCbCr;
    cinfo->out_color_space = JCS_RGB;
    return VJ_OK;
}

/* Rows [y0, y0 + h) of columns [x0, x0 + w) of the tile whose output pass cinfo is at the start of,
 * into out (rows of stride bytes): the rest cropped (with one iMCU either side when chroma is
 * subsampled, see the top) and skipped. line: a buffer of VJ_ROWS rows of tile_w * 3 bytes. Returns
 * VJ_OK or VJ_JPEG (libjpeg errors and warnings jump to the caller's setjmp). */
static int vj_rows(j_decompress_ptr cinfo, int tile_w, int x0, int y0, int w, int h, unsigned char *out,
                   size_t stride, unsigned char *line)
{
    int margin = cinfo->max_h_samp_factor > 1 ? cinfo->max_h_samp_factor * DCTSIZE : 0;
    int left = x0 - margin < 0 ? 0 : x0 - margin;
    int right = x0 + w + margin > tile_w ? tile_w : x0 + w + margin;
    JDIMENSION xoffset = (JDIMENSION)left, width = (JDIMENSION)(right - left);
    if (left > 0 || right < tile_w)
        jpeg_crop_scanline(cinfo, &xoffset, &width); /* widened to whole iMCUs by libjpeg */
    else
        xoffset = 0;
    if (y0 > 0 && jpeg_skip_scanlines(cinfo, (JDIMENSION)y0) != (JDIMENSION)y0)
        return VJ_JPEG;
    size_t from = (size_t)(x0 - (int)xoffset) * 3, row_bytes = (size_t)width * 3;
    JSAMPROW rows[VJ_ROWS];
    for (int i = 0; i < VJ_ROWS; i++)
        rows[i] = line + (size_t)i * row_bytes;
    for (int y = 0; y < h;) {
        JDIMENSION want = (JDIMENSION)(h - y < VJ_ROWS ? h - y : VJ_ROWS);
        JDIMENSION got = jpeg_read_scanlines(cinfo, rows, want);
        if (got == 0)
            return VJ_JPEG;
        for (JDIMENSION i = 0; i < got; i++, y++)
            memcpy(out + (size_t)y * stride, rows[i] + from, (size_t)w * 3);
    }
    return VJ_OK;
}

/* The count bytes at offset of fd into *buffer, grown to hold them (*capacity bytes). VJ_OK, VJ_READ or
 * VJ_MEMORY. */
static int vj_fetch(int fd, uint64_t offset, uint64_t count, unsigned char *volatile *buffer,
                    volatile uint64_t *capacity)
{
    if (count > *capacity) {
        unsigned char *grown = realloc(*buffer, (size_t)count);
        if (!grown)
            return VJ_MEMORY;
        *buffer = grown;
        *capacity = count;
    }
    return vj_pread(fd, *buffer, count, offset) == 0 ? VJ_OK : VJ_READ;
}

/* Decode the part [x0, x0 + w) x [y0, y0 + h) of one tile into out (rows of stride bytes), starting
 * from the level's tables. line: a buffer of VJ_ROWS rows of tile_w * 3 bytes. valid: the tile's byte,
 * nonzero once its data have been decoded to the end without a warning (set here when they are).
 * Returns VJ_OK or a VJ_ error. */
static int vj_tile(j_decompress_ptr cinfo, struct vj_error *err, const unsigned char *tables, uint64_t tables_len,
                   const unsigned char *data, uint64_t len, int rgb, int tile_w, int tile_h, int x0, int y0,
                   int w, int h, unsigned char *out, size_t stride, unsigned char *line, unsigned char *valid)
{
    if (setjmp(err->jump)) {
        jpeg_abort_decompress(cinfo);
        return VJ_JPEG;
    }
    int status = vj_header(cinfo, tables, tables_len, data, len, rgb, tile_w, tile_h);
    if (status != VJ_OK) {
        jpeg_abort_decompress(cinfo);
        return status;
    }
    jpeg_start_decompress(cinfo);
    if (cinfo->output_components != 3) {
        jpeg_abort_decompress(cinfo);
        return VJ_SHAPE;
    }

    status = vj_rows(cinfo, tile_w, x0, y0, w, h, out, stride, line);
    if (status != VJ_OK) {
        jpeg_abort_decompress(cinfo);
        return status;
    }
    if (cinfo->output_scanline < cinfo->output_height) {
        if (__atomic_load_n(valid, __ATOMIC_RELAXED)) { /* checked to its end before */
            jpeg_abort_decompress(cinfo);
            return VJ_OK;
        }
        /* all rows but the last skipped (entropy decoding only), the last read: libjpeg-turbo skips
           to the very end without decoding anything */
        JDIMENSION rest = cinfo->output_height - cinfo->output_scanline - 1;
        JSAMPROW row = line;
        if ((rest > 0 && jpeg_skip_scanlines(cinfo, rest) != rest) || jpeg_read_scanlines(cinfo, &row, 1) != 1) {
            jpeg_abort_decompress(cinfo);
            return VJ_JPEG;
        }
    }
    jpeg_finish_decompress(cinfo); /* reads to the end of the data: a warning there fails the tile too */
    __atomic_store_n(valid, 1, __ATOMIC_RELAXED);
    return VJ_OK;
}

/* ---------------------------------------------------------------------------------------------------
 * Tiles kept as coefficients. A tile read by one window is often read again soon by another (random
 * patches read in row order meet 40% of their tiles a second time), and each read above entropy-decodes
 * the tile from its start again. A kept tile was decoded once in libjpeg's buffered-image mode:
 * jpeg_consume_input to the end of its data (the same damage check: every warning fails the tile)
 * leaves all its coefficients in memory, and each window of it is then an output pass over them
 * (jpeg_start_output; cropped and skipped as above: in this mode skipping only moves the output row,
 * and the bytes are those of a full decode, as the Python side checks on every level before keeping).
 *
 * One store for the process, least recently used tiles given back first, within a budget of bytes
 * (vj_keep_configure; a 256 px tile with chroma not subsampled keeps 384 KiB of coefficients, counted as
 * 416 KiB with the rest of its decompressor: VJ_OVERHEAD). Tiles are keyed by
 * (level, tile): level is the reader's own number (vipsnorm.io.jpeg_tiles.JpegTiles), whose
 * vj_keep_drop gives its tiles back.
 *
 * keep 1 (adaptive): keeping costs a read that finds no kept tile about a tenth more than decoding it
 * the other way (coefficients written to memory and read back), so a tile is kept only while recent
 * reads would have found theirs: the last tiles met (as many as the budget keeps of 256 px tiles) are
 * listed without their data, and a running share of reads that met a listed tile is kept. Shuffled
 * reads of a large slide seldom meet one and go on decoding the other way. keep 2: always keep (the
 * Python side's check of a level). Progressive tiles are never kept (decoded the other way).
 *
 * libjpeg-turbo's jpeg_crop_scanline leaves the crop in the decompressor, partly in its internal
 * master struct (jpegint.h), and no later output pass resets it: the uncropped state is saved when the
 * tile is loaded and put back before every pass. Built only against the libjpeg-turbo versions whose
 * internals this was checked on (2.1.4 and later 2.x, 3.x: jpeg_skip_scanlines in buffered-image mode
 * was fixed in 2.1.4) and where jpegint.h is installed; elsewhere nothing is kept.
 *
 * A tile is kept only if its header says it can be (not progressive, its coefficients within the
 * budget) before a kept tile is given back for it.
 *
 * Threads: one lock for the store; a read that finds it busy decodes the other way rather than wait
 * (keep 2 waits). A fork waits for the store to be free (pthread_atfork), so the child's copy is whole.
 */

#if defined(__has_include)
#if __has_include(<jpegint.h>)
#define VJ_HAVE_JPEGINT 1 /* (Debian's libjpeg62-turbo-dev installs it; upstream's install does not) */
#endif
#endif
#if defined(VJ_HAVE_JPEGINT) && defined(LIBJPEG_TURBO_VERSION_NUMBER) \
    && LIBJPEG_TURBO_VERSION_NUMBER >= 2001004 && LIBJPEG_TURBO_VERSION_NUMBER < 4000000
#include <jpegint.h> /* (2.1.4 made jpeg_skip_scanlines work in buffered-image mode) */
#define VJ_KEEP 1
#else
#define VJ_KEEP 0
#endif

#define VJ_NOT_KEPT 1          /* (from vj_kept_tile) decode the tile the other way */
#define VJ_SLOTS 512           /* tiles kept at most */
#define VJ_SEEN_MAX 512        /* tiles listed at most */
#define VJ_TYPICAL_TILE 425984 /* bytes kept for a 256 px 4:4:4 tile, with libjpeg's other state */
#define VJ_OVERHEAD 32768      /* bytes counted for libjpeg's state beside a tile's coefficients */
#define VJ_REUSE_WORTH 0.2     /* share of reads meeting a listed tile above which tiles are kept */

int vj_keep_supported(void) { return VJ_KEEP; }

#if VJ_KEEP

typedef struct {
    uint64_t level; /* 0: a free slot */
    int64_t index;
    uint64_t used;  /* the store's clock at its last read */
    size_t bytes;
    int created;    /* cinfo created (destroyed with its tile: no tables of one file left for another's) */
    struct jpeg_decompress_struct cinfo;
    struct vj_error err;
    JDIMENSION output_width, downsampled_width[MAX_COMPONENTS];
    JDIMENSION first_iMCU_col, last_iMCU_col, first_MCU_col[MAX_COMPONENTS], last_MCU_col[MAX_COMPONENTS];
} vj_kept;

typedef struct {
    uint64_t level;
    int64_t index;
} vj_seen;

static struct {
    pthread_mutex_t lock;
    int fork_handlers;
    uint64_t budget, total, clock;
    vj_kept slots[VJ_SLOTS];
    vj_seen seen[VJ_SEEN_MAX];
    int seen_size, seen_next;
    double reuse;
    long hits, loads, others;
} vj_store = {.lock = PTHREAD_MUTEX_INITIALIZER, .reuse = 1.0, .seen_size = 1};

static void vj_store_lock(void) { pthread_mutex_lock(&vj_store.lock); }

static void vj_store_unlock(void) { pthread_mutex_unlock(&vj_store.lock); }

/* Give back slot's tile (its coefficients, and its decompressor). Store locked. */
static void vj_unkeep(vj_kept *slot)
{
    if (slot->created)
        jpeg_destroy_decompress(&slot->cinfo);
    slot->created = 0;
    if (slot->level == 0)
        return;
    vj_store.total -= slot->bytes;
    slot->level = 0;
    slot->index = -1;
    slot->bytes = 0;
}

/* Give back the least recently used tiles, other than `spare`, until the store is within its budget.
 * Store locked. */
static void vj_trim(const vj_kept *spare)
{
    while (vj_store.total > vj_store.budget) {
        vj_kept *oldest = NULL;
        for (int i = 0; i < VJ_SLOTS; i++) {
            vj_kept *slot = &vj_store.slots[i];
            if (slot->level != 0 && slot != spare && (!oldest || slot->used < oldest->used))
                oldest = slot;
        }
        if (!oldest)
            return;
        vj_unkeep(oldest);
    }
}

#endif /* VJ_KEEP */

/* Set the store's budget in bytes (0: keep nothing), giving back tiles beyond it; the list of tiles met
 * starts again. */
void vj_keep_configure(uint64_t budget)
{
#if VJ_KEEP
    vj_store_lock();
    if (!vj_store.fork_handlers) {
        pthread_atfork(vj_store_lock, vj_store_unlock, vj_store_unlock);
        vj_store.fork_handlers = 1;
    }
    vj_store.budget = budget;
    uint64_t listed = budget / VJ_TYPICAL_TILE;
    vj_store.seen_size = listed < 16 ? 16 : listed > VJ_SEEN_MAX ? VJ_SEEN_MAX : (int)listed;
    for (int i = 0; i < VJ_SEEN_MAX; i++)
        vj_store.seen[i].level = 0;
    vj_store.seen_next = 0;
    vj_store.reuse = 1.0;
    vj_trim(NULL);
    vj_store_unlock();
#else
    (void)budget;
#endif
}

/* Give back every tile kept for level. */
void vj_keep_drop(uint64_t level)
{
#if VJ_KEEP
    vj_store_lock();
    for (int i = 0; i < VJ_SLOTS; i++)
        if (vj_store.slots[i].level == level)
            vj_unkeep(&vj_store.slots[i]);
    vj_store_unlock();
#else
    (void)level;
#endif
}

/* Bytes kept for level. */
int64_t vj_keep_held(uint64_t level)
{
    int64_t bytes = 0;
#if VJ_KEEP
    vj_store_lock();
    for (int i = 0; i < VJ_SLOTS; i++)
        if (vj_store.slots[i].level == level)
            bytes += (int64_t)vj_store.slots[i].bytes;
    vj_store_unlock();
#else
    (void)level;
#endif
    return bytes;
}

/* The store's counts into out[6]: reads of kept tiles, tiles kept (loaded), tile reads decoded the
 * other way while keeping was asked for, bytes kept, tiles kept now, budget. */
void vj_keep_stats(int64_t *out)
{
    for (int i = 0; i < 6; i++)
        out[i] = 0;
#if VJ_KEEP
    vj_store_lock();
    out[0] = vj_store.hits;
    out[1] = vj_store.loads;
    out[2] = vj_store.others;
    out[3] = (int64_t)vj_store.total;
    for (int i = 0; i < VJ_SLOTS; i++)
        out[4] += vj_store.slots[i].level != 0;
    out[5] = (int64_t)vj_store.budget;
    vj_store_unlock();
#endif
}

#if VJ_KEEP

/* Bytes a tile whose header cinfo has read keeps: its coefficients (whole MCUs) and VJ_OVERHEAD. */
static size_t vj_keep_bytes(j_decompress_ptr cinfo)
{
    size_t bytes = VJ_OVERHEAD;
    for (int ci = 0; ci < cinfo->num_components; ci++) {
        const jpeg_component_info *c = &cinfo->comp_info[ci];
        size_t across = (c->width_in_blocks + c->h_samp_factor - 1) / c->h_samp_factor * c->h_samp_factor;
        size_t down = (c->height_in_blocks + c->v_samp_factor - 1) / c->v_samp_factor * c->v_samp_factor;
        bytes += across * down * sizeof(JBLOCK);
    }
    return bytes;
}

/* Whether the tile (its len bytes at data) may be kept, from its header read with cinfo (a decompressor
 * not in use): VJ_OK, or VJ_NOT_KEPT when it is progressive, larger than the budget, or its header is
 * not what the level says (decoded the other way, which reports that as it always did). */
static int vj_keep_fits(j_decompress_ptr cinfo, struct vj_error *err, const unsigned char *tables,
                        uint64_t tables_len, const unsigned char *data, uint64_t len, int rgb, int tile_w,
                        int tile_h)
{
    if (setjmp(err->jump)) {
        jpeg_abort_decompress(cinfo);
        return VJ_NOT_KEPT;
    }
    int fits = vj_header(cinfo, tables, tables_len, data, len, rgb, tile_w, tile_h) == VJ_OK
               && !cinfo->progressive_mode && vj_keep_bytes(cinfo) <= vj_store.budget;
    jpeg_abort_decompress(cinfo);
    return fits ? VJ_OK : VJ_NOT_KEPT;
}

/* Load the tile (its len bytes at data; vj_keep_fits said it may be kept) into slot: all its data
 * consumed in buffered-image mode, the uncropped output state saved. Returns VJ_OK, or a VJ_ error (the
 * slot then free). Store locked. */
static int vj_keep_load(vj_kept *slot, uint64_t level, int64_t index, const unsigned char *tables,
                        uint64_t tables_len, const unsigned char *data, uint64_t len, int rgb, int tile_w,
                        int tile_h)
{
    j_decompress_ptr cinfo = &slot->cinfo;
    vj_unkeep(slot); /* (a new decompressor for every tile: one file's tables never decode another's) */
    if (setjmp(slot->err.jump)) {
        vj_unkeep(slot);
        return VJ_JPEG;
    }
    cinfo->err = vj_errors(&slot->err);
    jpeg_create_decompress(cinfo);
    slot->created = 1;
    int status = vj_header(cinfo, tables, tables_len, data, len, rgb, tile_w, tile_h);
    if (status == VJ_OK) {
        cinfo->buffered_image = TRUE;
        jpeg_start_decompress(cinfo);
        if (cinfo->output_components != 3)
            status = VJ_SHAPE;
    }
    while (status == VJ_OK) { /* to the end of the data: a warning fails the tile */
        int got = jpeg_consume_input(cinfo);
        if (got == JPEG_REACHED_EOI)
            break;
        if (got == JPEG_SUSPENDED) /* (the data ended with no end marker: libjpeg warns first) */
            status = VJ_JPEG;
    }
    if (status != VJ_OK) {
        vj_unkeep(slot);
        return status;
    }
    /* the data are all consumed: a pass reading more (it should not) hits the end and its warning */
    cinfo->src->next_input_byte = NULL;
    cinfo->src->bytes_in_buffer = 0;
    for (int ci = 0; ci < cinfo->num_components; ci++) {
        const jpeg_component_info *c = &cinfo->comp_info[ci];
        slot->downsampled_width[ci] = c->downsampled_width;
        slot->first_MCU_col[ci] = cinfo->master->first_MCU_col[ci];
        slot->last_MCU_col[ci] = cinfo->master->last_MCU_col[ci];
    }
    slot->output_width = cinfo->output_width;
    slot->first_iMCU_col = cinfo->master->first_iMCU_col;
    slot->last_iMCU_col = cinfo->master->last_iMCU_col;
    slot->level = level;
    slot->index = index;
    slot->bytes = vj_keep_bytes(cinfo);
    vj_store.total += slot->bytes;
    return VJ_OK;
}

/* One output pass of a kept tile: the part (x0, y0, w, h) into out. VJ_OK, or VJ_JPEG (the tile is then
 * given back). Store locked. */
static int vj_keep_pass(vj_kept *slot, int tile_w, int x0, int y0, int w, int h, unsigned char *out,
                        size_t stride, unsigned char *line)
{
    j_decompress_ptr cinfo = &slot->cinfo;
    if (setjmp(slot->err.jump)) {
        vj_unkeep(slot);
        return VJ_JPEG;
    }
    cinfo->output_width = slot->output_width;
    for (int ci = 0; ci < cinfo->num_components; ci++) {
        cinfo->comp_info[ci].downsampled_width = slot->downsampled_width[ci];
        cinfo->master->first_MCU_col[ci] = slot->first_MCU_col[ci];
        cinfo->master->last_MCU_col[ci] = slot->last_MCU_col[ci];
    }
    cinfo->master->first_iMCU_col = slot->first_iMCU_col;
    cinfo->master->last_iMCU_col = slot->last_iMCU_col;
    jpeg_start_output(cinfo, cinfo->input_scan_number);
    int status = vj_rows(cinfo, tile_w, x0, y0, w, h, out, stride, line);
    jpeg_finish_output(cinfo);
    if (status != VJ_OK)
        vj_unkeep(slot);
    return status;
}

#endif /* VJ_KEEP */

/* The part (x0, y0, w, h) of tile `index` of `level` from the store, loading the tile (its count bytes
 * at offset of fd, read into *buffer as vj_fetch does) if it is not kept and keeping is worth it (keep
 * 1) or asked for (keep 2). Returns VJ_OK, a VJ_ error, or VJ_NOT_KEPT: decode it the other way. */
static int vj_kept_tile(uint64_t level, int keep, int64_t index, int fd, uint64_t offset, uint64_t count,
                        unsigned char *volatile *buffer, volatile uint64_t *capacity, int *fetched,
                        j_decompress_ptr scratch, struct vj_error *scratch_err, const unsigned char *tables,
                        uint64_t tables_len, int rgb, int tile_w, int tile_h, int x0, int y0, int w, int h,
                        unsigned char *out, size_t stride, unsigned char *line, unsigned char *valid)
{
#if VJ_KEEP
    if (keep == 2)
        vj_store_lock();
    else if (pthread_mutex_trylock(&vj_store.lock) != 0)
        return VJ_NOT_KEPT; /* another thread reads kept tiles: do not wait */
    if (vj_store.budget == 0) {
        vj_store_unlock();
        return VJ_NOT_KEPT;
    }
    /* the list of tiles met, and the share of reads that met one listed */
    int met = 0;
    for (int i = 0; i < vj_store.seen_size && !met; i++)
        met = vj_store.seen[i].level == level && vj_store.seen[i].index == index;
    if (!met) {
        vj_store.seen[vj_store.seen_next] = (vj_seen){level, index};
        vj_store.seen_next = (vj_store.seen_next + 1) % vj_store.seen_size;
    }
    vj_store.reuse += ((met ? 1.0 : 0.0) - vj_store.reuse) / 64.0;

    vj_kept *slot = NULL, *oldest = NULL;
    for (int i = 0; i < VJ_SLOTS; i++) {
        vj_kept *s = &vj_store.slots[i];
        if (s->level == level && s->index == index) {
            slot = s;
            break;
        }
        if (!oldest || (oldest->level != 0 && (s->level == 0 || s->used < oldest->used)))
            oldest = s; /* a free slot first, else the least recently used */
    }
    int status = VJ_OK;
    if (slot) {
        vj_store.hits++;
    } else if (keep == 1 && vj_store.reuse < VJ_REUSE_WORTH) {
        vj_store.others++;
        vj_store_unlock();
        return VJ_NOT_KEPT;
    } else {
        slot = oldest;
        status = vj_fetch(fd, offset, count, buffer, capacity);
        *fetched = status == VJ_OK;
        if (status == VJ_OK) /* (from the header: nothing given back for a tile that cannot be kept) */
            status = vj_keep_fits(scratch, scratch_err, tables, tables_len, *buffer, count, rgb, tile_w, tile_h);
        if (status == VJ_NOT_KEPT)
            vj_store.others++;
        if (status == VJ_OK)
            status = vj_keep_load(slot, level, index, tables, tables_len, *buffer, count, rgb, tile_w, tile_h);
        if (status != VJ_OK) {
            vj_store_unlock();
            return status;
        }
        vj_store.loads++;
        __atomic_store_n(valid, 1, __ATOMIC_RELAXED);
        vj_trim(slot);
    }
    slot->used = ++vj_store.clock;
    status = vj_keep_pass(slot, tile_w, x0, y0, w, h, out, stride, line);
    vj_store_unlock();
    return status;
#else
    (void)level, (void)keep, (void)index, (void)fd, (void)offset, (void)count, (void)buffer, (void)capacity;
    (void)fetched, (void)scratch, (void)scratch_err;
    (void)tables, (void)tables_len, (void)rgb;
    (void)tile_w, (void)tile_h, (void)x0, (void)y0, (void)w, (void)h, (void)out, (void)stride, (void)line;
    (void)valid;
    return VJ_NOT_KEPT;
#endif
}

/* The window (x, y, w, h) of a level of JPEG tiles into out (h rows of w * 3 bytes, RGB).
 *
 * fd: the open TIFF; tables, tables_len: its JPEGTables (an abbreviated stream, may be empty);
 * offsets, counts: the level's tiles in row-major order (ntiles of them, tiles_across a row);
 * valid: ntiles bytes, the tiles already decoded to their end without a warning (see the top);
 * tile_w, tile_h: their size; level_w, level_h: the level's; rgb: 1 when the photometric
 * interpretation is RGB (the JPEG holds RGB), 0 for YCbCr.
 * Returns VJ_OK or a negative VJ_ error (out then holds part of the window). */
static int vj_read(int fd, const unsigned char *tables, uint64_t tables_len, const uint64_t *offsets,
                   const uint64_t *counts, unsigned char *valid, int64_t ntiles, int tiles_across, int tile_w,
                   int tile_h, int level_w, int level_h, int rgb, int x, int y, int w, int h, unsigned char *out,
                   size_t stride, uint64_t level, int keep);

int vj_window(int fd, const unsigned char *tables, uint64_t tables_len, const uint64_t *offsets,
              const uint64_t *counts, unsigned char *valid, int64_t ntiles, int tiles_across, int tile_w, int tile_h, int level_w,
              int level_h, int rgb, int x, int y, int w, int h, unsigned char *out, uint64_t level, int keep)
{
    return vj_read(fd, tables, tables_len, offsets, counts, valid, ntiles, tiles_across, tile_w, tile_h, level_w,
                   level_h, rgb, x, y, w, h, out, (size_t)w * 3, level, keep);
}

/* vj_window with rows of out stride bytes apart */
static int vj_read(int fd, const unsigned char *tables, uint64_t tables_len, const uint64_t *offsets,
                   const uint64_t *counts, unsigned char *valid, int64_t ntiles, int tiles_across, int tile_w,
                   int tile_h, int level_w, int level_h, int rgb, int x, int y, int w, int h, unsigned char *out,
                   size_t stride, uint64_t level, int keep)
{
    if (w <= 0 || h <= 0 || x < 0 || y < 0 || x > level_w - w || y > level_h - h || tile_w <= 0 || tile_h <= 0
        || tiles_across <= 0)
        return VJ_SHAPE;
    struct jpeg_decompress_struct cinfo;
    struct vj_error err;
    unsigned char *volatile buffer = NULL;
    volatile uint64_t capacity = 0;
    struct stat file;
    if (fstat(fd, &file) != 0)
        return VJ_READ;
    unsigned char *volatile line = malloc((size_t)tile_w * 3 * VJ_ROWS);
    if (!line)
        return VJ_MEMORY;
    cinfo.err = vj_errors(&err);
    if (setjmp(err.jump)) { /* from jpeg_create_decompress */
        jpeg_destroy_decompress(&cinfo);
        free(line);
        free(buffer);
        return VJ_JPEG;
    }
    jpeg_create_decompress(&cinfo);
    int status = VJ_OK;
    for (int ty = y / tile_h; status == VJ_OK && ty <= (y + h - 1) / tile_h; ty++) {
        for (int tx = x / tile_w; status == VJ_OK && tx <= (x + w - 1) / tile_w; tx++) {
            int64_t index = (int64_t)ty * tiles_across + tx;
            if (tx >= tiles_across || index >= ntiles) {
                status = VJ_SHAPE;
                break;
            }
            uint64_t count = counts[index];
            if (count == 0 || count > VJ_MAX_TILE_BYTES || offsets[index] > (uint64_t)file.st_size
                || count > (uint64_t)file.st_size - offsets[index]) { /* missing (sparse), absurd, or past the end */
                status = VJ_READ;
                break;
            }
            int ax0 = x > tx * tile_w ? x : tx * tile_w;
            int ay0 = y > ty * tile_h ? y : ty * tile_h;
            int ax1 = x + w < (tx + 1) * tile_w ? x + w : (tx + 1) * tile_w;
            int ay1 = y + h < (ty + 1) * tile_h ? y + h : (ty + 1) * tile_h;
            unsigned char *to = out + (size_t)(ay0 - y) * stride + (size_t)(ax0 - x) * 3;
            int fetched = 0;
            if (keep) {
                status = vj_kept_tile(level, keep, index, fd, offsets[index], count, &buffer, &capacity, &fetched,
                                      &cinfo, &err, tables, tables_len, rgb, tile_w, tile_h, ax0 - tx * tile_w,
                                      ay0 - ty * tile_h, ax1 - ax0, ay1 - ay0, to, stride, line, valid + index);
                if (status != VJ_NOT_KEPT)
                    continue;
                status = VJ_OK;
            }
            if (!fetched)
                status = vj_fetch(fd, offsets[index], count, &buffer, &capacity);
            if (status == VJ_OK)
                status = vj_tile(&cinfo, &err, tables, tables_len, buffer, count, rgb, tile_w, tile_h,
                                 ax0 - tx * tile_w, ay0 - ty * tile_h, ax1 - ax0, ay1 - ay0, to, stride, line,
                                 valid + index);
        }
    }
    jpeg_destroy_decompress(&cinfo);
    free(line);
    free(buffer);
    return status;
}

/* ---------------------------------------------------------------------------------------------------
 * A level as a pixel source for libvips (vipsnorm._native.tile_source), for a pass over a whole level
 * from top to bottom (a slide written out). libvips' TIFF loader decodes the tiles of one loaded file
 * one at a time, and so would a tile cache in front of this: the threads writing a pyramid all work in
 * the same row of tiles, and wait for each other's tile. Here a row of tiles ("band") is decoded by
 * every thread that needs it, each taking the next tile not yet taken, into a band buffer that then
 * serves every request in its rows. A few bands are kept, the least recently used reused.
 *
 * The level holds copies of everything it reads from, its own file descriptor among them, so that it
 * outlives the Python objects it was made from.
 */


#define VJ_BANDS 3

typedef struct {
    int row;            /* tile row held, -1: none */
    int filling;        /* tiles still being decoded */
    int next, done;     /* the next tile to take, the tiles done */
    int failed;         /* a tile failed: requests in it go to libvips */
    int users;          /* requests copying from it */
    uint64_t used;      /* last use, for reuse of the least recent */
    unsigned char *pixels; /* tile_h rows of level_w * 3 bytes */
} vj_band;

typedef struct {
    int fd;
    unsigned char *tables;
    uint64_t tables_len;
    uint64_t *offsets, *counts;
    unsigned char *valid;
    int64_t ntiles;
    int tiles_across, tile_w, tile_h, level_w, level_h, rgb;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    uint64_t clock;
    int released; /* vj_level_release was called: reads fail (the caller asks libvips) */
    int refs;     /* holders: the libvips image, and the slide while open (vj_level_ref) */
    vj_band bands[VJ_BANDS];
} vj_level;

static void vj_level_destroy(vj_level *level)
{
    if (level->fd >= 0)
        close(level->fd);
    free(level->tables);
    free(level->offsets);
    free(level->counts);
    free(level->valid);
    for (int i = 0; i < VJ_BANDS; i++)
        free(level->bands[i].pixels);
    pthread_mutex_destroy(&level->lock);
    pthread_cond_destroy(&level->changed);
    free(level);
}

/* Another holder of the level. */
void vj_level_ref(void *pointer) { __atomic_add_fetch(&((vj_level *)pointer)->refs, 1, __ATOMIC_ACQ_REL); }

/* A holder lets go of the level; the last frees it. */
void vj_level_free(void *pointer)
{
    vj_level *level = pointer;
    if (level && __atomic_sub_fetch(&level->refs, 1, __ATOMIC_ACQ_REL) == 0)
        vj_level_destroy(level);
}

/* Give back the level's memory and file now (its slide is closed), though libvips may keep the image
 * (in its operation cache, say): reads from then on fail, and the image asks libvips' loader. Waits for
 * reads under way. */
void vj_level_release(void *pointer)
{
    vj_level *l = pointer;
    pthread_mutex_lock(&l->lock);
    l->released = 1;
    for (;;) {
        int busy = 0;
        for (int i = 0; i < VJ_BANDS; i++)
            busy |= l->bands[i].filling || l->bands[i].users > 0;
        if (!busy)
            break;
        pthread_cond_wait(&l->changed, &l->lock);
    }
    for (int i = 0; i < VJ_BANDS; i++) {
        free(l->bands[i].pixels);
        l->bands[i].pixels = NULL;
        l->bands[i].row = -1;
    }
    if (l->fd >= 0)
        close(l->fd);
    l->fd = -1;
    pthread_cond_broadcast(&l->changed);
    pthread_mutex_unlock(&l->lock);
}

/* A level of the open TIFF fd (duplicated here), as for vj_window, with one holder; NULL when out of
 * memory or descriptors. Rows of tiles are allocated as they are first needed. */
void *vj_level_new(int fd, const unsigned char *tables, uint64_t tables_len, const uint64_t *offsets,
                   const uint64_t *counts, int64_t ntiles, int tiles_across, int tile_w, int tile_h, int level_w,
                   int level_h, int rgb)
{
    if (ntiles <= 0 || tiles_across <= 0 || tile_w <= 0 || tile_h <= 0 || level_w <= 0 || level_h <= 0
        || (int64_t)tiles_across * ((level_h + tile_h - 1) / tile_h) > ntiles)
        return NULL;
    vj_level *level = calloc(1, sizeof *level);
    if (!level)
        return NULL;
    pthread_mutex_init(&level->lock, NULL);
    pthread_cond_init(&level->changed, NULL);
    level->fd = dup(fd);
    level->tables = malloc(tables_len ? (size_t)tables_len : 1);
    level->offsets = malloc((size_t)ntiles * sizeof(uint64_t));
    level->counts = malloc((size_t)ntiles * sizeof(uint64_t));
    level->valid = calloc((size_t)ntiles, 1);
    level->refs = 1;
    for (int i = 0; i < VJ_BANDS; i++)
        level->bands[i].row = -1;
    if (level->fd < 0 || !level->tables || !level->offsets || !level->counts || !level->valid) {
        vj_level_free(level);
        return NULL;
    }
    if (tables_len)
        memcpy(level->tables, tables, (size_t)tables_len);
    memcpy(level->offsets, offsets, (size_t)ntiles * sizeof(uint64_t));
    memcpy(level->counts, counts, (size_t)ntiles * sizeof(uint64_t));
    level->tables_len = tables_len;
    level->ntiles = ntiles;
    level->tiles_across = tiles_across;
    level->tile_w = tile_w;
    level->tile_h = tile_h;
    level->level_w = level_w;
    level->level_h = level_h;
    level->rgb = rgb;
    return level;
}

/* The band holding tile row `row`, decoded (with this thread's help), its `users` counted; NULL when
 * the level is released or a band's memory cannot be had. Called with the lock held; returns with it
 * held. */
static vj_band *vj_band_get(vj_level *l, int row)
{
    for (;;) {
        if (l->released)
            return NULL;
        vj_band *band = NULL, *free_band = NULL;
        for (int i = 0; i < VJ_BANDS; i++) {
            vj_band *b = &l->bands[i];
            if (b->row == row)
                band = b;
            else if (!b->filling && b->users == 0 && (!free_band || b->used < free_band->used))
                free_band = b;
        }
        if (!band && !free_band) { /* every band busy: wait for one */
            pthread_cond_wait(&l->changed, &l->lock);
            continue;
        }
        if (!band) {
            band = free_band;
            if (!band->pixels && !(band->pixels = malloc((size_t)l->tile_h * (size_t)l->level_w * 3)))
                return NULL;
            band->row = row;
            band->filling = 1;
            band->next = band->done = band->failed = 0;
            band->used = ++l->clock; /* (else, decoded, it could be taken for reuse before its waiters see it) */
        }
        int top = row * l->tile_h, h = l->level_h - top < l->tile_h ? l->level_h - top : l->tile_h;
        while (band->filling && band->next < l->tiles_across) { /* take tiles not yet taken */
            int tx = band->next++;
            int x = tx * l->tile_w, w = l->level_w - x < l->tile_w ? l->level_w - x : l->tile_w;
            pthread_mutex_unlock(&l->lock);
            int status = vj_read(l->fd, l->tables, l->tables_len, l->offsets, l->counts, l->valid, l->ntiles,
                                 l->tiles_across, l->tile_w, l->tile_h, l->level_w, l->level_h, l->rgb, x, top, w, h,
                                 band->pixels + (size_t)x * 3, (size_t)l->level_w * 3, 0, 0);
            pthread_mutex_lock(&l->lock);
            band->failed |= status != VJ_OK;
            if (++band->done == l->tiles_across) {
                band->filling = 0;
                pthread_cond_broadcast(&l->changed);
            }
        }
        while (band->filling && band->row == row) /* the rest is being decoded by other threads */
            pthread_cond_wait(&l->changed, &l->lock);
        if (band->row != row) /* reused once decoded, before this thread woke (rare): again */
            continue;
        band->users++;
        band->used = ++l->clock;
        return band;
    }
}

/* The window (x, y, w, h) of the level into out, rows stride bytes apart: VJ_OK, or VJ_JPEG when a tile
 * of it could not be decoded (the caller then asks libvips for the window), VJ_SHAPE outside the level.
 * Thread-safe. */
int vj_level_read(void *pointer, int x, int y, int w, int h, unsigned char *out, long stride)
{
    vj_level *l = pointer;
    if (stride < (long)w * 3 || w <= 0 || h <= 0 || x < 0 || y < 0 || x > l->level_w - w || y > l->level_h - h)
        return VJ_SHAPE;
    int status = VJ_OK;
    pthread_mutex_lock(&l->lock);
    for (int row = y / l->tile_h; status == VJ_OK && row <= (y + h - 1) / l->tile_h; row++) {
        vj_band *band = vj_band_get(l, row);
        if (!band) {
            status = VJ_READ;
            break;
        }
        if (band->failed) {
            status = VJ_JPEG;
        } else {
            pthread_mutex_unlock(&l->lock);
            int top = row * l->tile_h;
            int y0 = y > top ? y : top, y1 = y + h < top + l->tile_h ? y + h : top + l->tile_h;
            for (int yy = y0; yy < y1; yy++)
                memcpy(out + (size_t)(yy - y) * (size_t)stride,
                       band->pixels + ((size_t)(yy - top) * (size_t)l->level_w + (size_t)x) * 3, (size_t)w * 3);
            pthread_mutex_lock(&l->lock);
        }
        band->users--;
        pthread_cond_broadcast(&l->changed);
    }
    pthread_mutex_unlock(&l->lock);
    return status;
}

/* ---------------------------------------------------------------------------------------------------
 * Whole JPEG files (vipsnorm.io.small_jpeg): a small ordinary JPEG decoded here rather than by libvips,
 * whose bundled decoder (pyvips-binary's mozjpeg) took 2.2 ms where this one takes 0.9 on a 512x512
 * JPEG. Only files of a layout the Python side has checked (in each process, on JPEGs vj_encode made)
 * to decode to libvips' bytes are decoded: 8-bit, Huffman-coded, grey or three components (YCbCr or
 * RGB) whose chroma is not subsampled more finely than luma in a listed way. Anything else, and every
 * libjpeg warning, gives a negative return: the caller then decodes the file with libvips, which
 * reports any damage as it always did.
 */

/* luma sampling factors (h, v) with 1x1 chroma: 4:4:4, 4:2:2, 4:4:0, 4:2:0, 4:1:1 */
static const int vj_layouts[][2] = {{1, 1}, {2, 1}, {1, 2}, {2, 2}, {4, 1}};

int vj_layout_count(void) { return (int)(sizeof vj_layouts / sizeof vj_layouts[0]); }

static int vj_layout_known(j_decompress_ptr cinfo)
{
    if (cinfo->num_components == 1)
        return cinfo->jpeg_color_space == JCS_GRAYSCALE;
    if (cinfo->num_components != 3 || (cinfo->jpeg_color_space != JCS_YCbCr && cinfo->jpeg_color_space != JCS_RGB))
        return 0;
    for (int c = 1; c < 3; c++)
        if (cinfo->comp_info[c].h_samp_factor != 1 || cinfo->comp_info[c].v_samp_factor != 1)
            return 0;
    const jpeg_component_info *luma = &cinfo->comp_info[0];
    for (int i = 0; i < vj_layout_count(); i++)
        if (luma->h_samp_factor == vj_layouts[i][0] && luma->v_samp_factor == vj_layouts[i][1])
            return 1;
    return 0;
}

/* The JPEG in the file path (or, path NULL, the len bytes at data) into out: h rows of w * components
 * bytes. Returns VJ_OK; VJ_SHAPE when it is not w x h with that many components, or not of a checked
 * layout; VJ_READ when the file cannot be opened; VJ_JPEG on any libjpeg error or warning. */
int vj_decode(const char *path, const unsigned char *data, uint64_t len, int w, int h, int components,
              unsigned char *out)
{
    struct jpeg_decompress_struct cinfo;
    struct vj_error err;
    FILE *volatile file = NULL;
    if (path) {
        file = fopen(path, "rb");
        if (!file)
            return VJ_READ;
    }
    cinfo.err = vj_errors(&err);
    volatile int status = VJ_JPEG;
    if (setjmp(err.jump))
        goto done;
    jpeg_create_decompress(&cinfo);
    if (file)
        jpeg_stdio_src(&cinfo, file);
    else
        jpeg_mem_src(&cinfo, data, (unsigned long)len);
    if (jpeg_read_header(&cinfo, TRUE) != JPEG_HEADER_OK)
        goto done;
    status = VJ_SHAPE;
    if ((int)cinfo.image_width != w || (int)cinfo.image_height != h || cinfo.num_components != components
        || cinfo.data_precision != 8 || cinfo.arith_code || !vj_layout_known(&cinfo))
        goto done;
    status = VJ_JPEG;
    cinfo.out_color_space = components == 3 ? JCS_RGB : JCS_GRAYSCALE; /* as libvips' jpegload asks */
    jpeg_start_decompress(&cinfo);
    status = VJ_SHAPE;
    if ((int)cinfo.output_width != w || (int)cinfo.output_height != h || cinfo.output_components != components)
        goto done;
    status = VJ_JPEG;
    size_t stride = (size_t)w * (size_t)components;
    JSAMPROW rows[VJ_ROWS];
    while (cinfo.output_scanline < cinfo.output_height) {
        JDIMENSION at = cinfo.output_scanline, want = cinfo.output_height - at;
        if (want > VJ_ROWS)
            want = VJ_ROWS;
        for (JDIMENSION i = 0; i < want; i++)
            rows[i] = out + (size_t)(at + i) * stride;
        if (jpeg_read_scanlines(&cinfo, rows, want) == 0)
            goto done;
    }
    jpeg_finish_decompress(&cinfo); /* reads to the end of the data: a warning there fails it too */
    status = VJ_OK;
done:
    jpeg_destroy_decompress(&cinfo);
    if (file)
        fclose(file);
    return status;
}

/* A growable buffer as libjpeg's destination. (libjpeg's own jpeg_mem_dest hands a buffer it had to
 * grow back only at the end of compression: after an error it is lost to the caller.) */
struct vj_dest {
    struct jpeg_destination_mgr pub;
    unsigned char *buffer;
    size_t size;
};

static void vj_dest_start(j_compress_ptr cinfo) { (void)cinfo; }

static boolean vj_dest_grow(j_compress_ptr cinfo)
{
    struct vj_dest *dest = (struct vj_dest *)cinfo->dest;
    size_t used = dest->size; /* (called when the buffer is full) */
    unsigned char *grown = used <= SIZE_MAX / 2 ? realloc(dest->buffer, used * 2) : NULL;
    if (!grown)
        longjmp(((struct vj_error *)cinfo->err)->jump, 1); /* (out of memory: as any libjpeg error) */
    dest->buffer = grown;
    dest->size = used * 2;
    dest->pub.next_output_byte = grown + used;
    dest->pub.free_in_buffer = used;
    return TRUE;
}

static void vj_dest_end(j_compress_ptr cinfo) { (void)cinfo; }

/* How vj_compress codes: quality; for 3 components, RGB (rgb nonzero) or YCbCr with luma sampled as
 * vj_layouts[layout] (chroma 1x1); progressive or baseline; a restart marker every `restart` MCU rows
 * (0: none); with or without a JFIF marker. */
struct vj_coding {
    int quality, rgb, layout, progressive, restart, jfif;
};

/* w x h pixels (rows of w * components bytes; components 1, grey, or 3, RGB) coded as `coding` says.
 * *out (free it with vj_free) holds the file, SOI to EOI, *size bytes. Returns VJ_OK, VJ_SHAPE (bad
 * arguments), VJ_MEMORY or VJ_JPEG. Calls no Python. */
static int vj_compress(const unsigned char *pixels, int w, int h, int components, const struct vj_coding *coding,
                       unsigned char **out, unsigned long *size)
{
    struct jpeg_compress_struct cinfo;
    struct vj_error err;
    struct vj_dest dest;
    *out = NULL;
    *size = 0;
    if (w <= 0 || h <= 0 || w > 65500 || h > 65500 || (components != 1 && components != 3) || coding->quality < 1
        || coding->quality > 100 || coding->layout < 0 || coding->layout >= vj_layout_count())
        return VJ_SHAPE;
    /* a first buffer a JPEG of these pixels seldom outgrows (Q90 H&E: about a third of the raw bytes) */
    dest.size = (size_t)w * (size_t)h * (size_t)components / 2 + 65536;
    dest.buffer = malloc(dest.size);
    if (!dest.buffer)
        return VJ_MEMORY;
    dest.pub.init_destination = vj_dest_start;
    dest.pub.empty_output_buffer = vj_dest_grow;
    dest.pub.term_destination = vj_dest_end;
    dest.pub.next_output_byte = dest.buffer;
    dest.pub.free_in_buffer = dest.size;
    cinfo.err = vj_errors(&err);
    if (setjmp(err.jump)) {
        jpeg_destroy_compress(&cinfo);
        free(((volatile struct vj_dest *)&dest)->buffer); /* (as vj_dest_grow last left it) */
        return VJ_JPEG;
    }
    jpeg_create_compress(&cinfo);
    cinfo.dest = &dest.pub;
    cinfo.image_width = (JDIMENSION)w;
    cinfo.image_height = (JDIMENSION)h;
    cinfo.input_components = components;
    cinfo.in_color_space = components == 3 ? JCS_RGB : JCS_GRAYSCALE;
    jpeg_set_defaults(&cinfo);
    jpeg_set_quality(&cinfo, coding->quality, TRUE);
    cinfo.write_JFIF_header = coding->jfif ? TRUE : FALSE;
    cinfo.optimize_coding = FALSE;
    if (components == 3 && coding->rgb)
        jpeg_set_colorspace(&cinfo, JCS_RGB);
    else if (components == 3) {
        cinfo.comp_info[0].h_samp_factor = vj_layouts[coding->layout][0];
        cinfo.comp_info[0].v_samp_factor = vj_layouts[coding->layout][1];
    }
    if (coding->progressive)
        jpeg_simple_progression(&cinfo);
    cinfo.restart_in_rows = coding->restart;
    jpeg_start_compress(&cinfo, TRUE);
    while (cinfo.next_scanline < cinfo.image_height) {
        JSAMPROW row = (JSAMPROW)(pixels + (size_t)cinfo.next_scanline * (size_t)w * (size_t)components);
        jpeg_write_scanlines(&cinfo, &row, 1);
    }
    jpeg_finish_compress(&cinfo);
    jpeg_destroy_compress(&cinfo);
    *out = dest.buffer;
    *size = (unsigned long)(dest.size - dest.pub.free_in_buffer);
    return VJ_OK;
}

/* Encode w x h pixels as a JPEG in memory, for the Python side's check of vj_decode against libvips:
 * components 3 stored as YCbCr with luma sampled as vj_layouts[layout], or as RGB (rgb nonzero);
 * progressive or baseline; restart: a restart marker every that many MCU rows (0: none); quality 80,
 * with a JFIF marker. As vj_compress. */
int vj_encode(const unsigned char *pixels, int w, int h, int components, int rgb, int layout, int progressive,
              int restart, unsigned char **out, unsigned long *size)
{
    const struct vj_coding coding = {80, rgb, layout, progressive, restart, 1};
    return vj_compress(pixels, w, h, components, &coding, out, size);
}

/* Encode w x h pixels as libvips' jpegsave does by default with libjpeg-turbo (or mozjpeg set to its
 * libjpeg-turbo-compatible profile): baseline, quality q (the IJG tables scaled to q), YCbCr with chroma
 * not subsampled at q >= 90 and 4:2:0 below, standard Huffman tables, no restart markers, and no JFIF
 * marker (libvips writes none: its file holds only the metadata markers it puts after the SOI, which
 * the Python side puts there; see vipsnorm.io.small_jpeg.save). As vj_compress. */
int vj_save(const unsigned char *pixels, int w, int h, int components, int quality, unsigned char **out,
            unsigned long *size)
{
    const struct vj_coding coding = {quality, 0, quality >= 90 ? 0 : 3, 0, 0, 0}; /* 4:4:4 or 4:2:0 */
    return vj_compress(pixels, w, h, components, &coding, out, size);
}

void vj_free(void *pointer) { free(pointer); }

/* A module only so that the build makes it (and pip installs it); vipsnorm.io.jpeg_tiles loads the
 * functions above with ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpegtiles", NULL, -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__jpegtiles(void) { return PyModule_Create(&module); }
