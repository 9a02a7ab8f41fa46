/* vipsnorm's native colour kernel: the per-pixel pipelines of the colour methods, run in one pass.

   The methods describe their apply step as a short chain of table lookups and 3x3 matrices
   (methods/_stain.py, methods/_hist.py). libvips runs each step as its own operation, one buffer per
   step; this file runs the whole chain on each pixel (a "program"), with the same arithmetic, step
   for step, as the libvips operations it stands for, so that both give the same bytes (the tests
   compare them on every colour of a 2^24 cube). A program can also keep its outputs in a table of
   every RGB colour (a "cube", 64 MiB of address space), filled block by block (32 colours along R at
   one G and B at a time) as the pixels met need them, after which a pixel costs one lookup: worth it
   for images of more than some tens of megapixels. 1000 patches of an H&E slide show 155,000 colours:
   blocks of one B value (65536 colours) filled 6.9 million for them, blocks of 256 along R 1.8
   million, blocks of 32 0.39 million. A filled entry carries a mark (VK_FILLED), so that a lookup reads
   only the entry.

   The kernel is an image of libvips' own kind (vips_image_generate, as libvips' operations are built),
   so it streams inside a lazy pipeline. It is compiled without libvips' headers: Python finds the
   libvips already loaded by pyvips and passes the few functions used here (vk_init). The one layout
   assumed is the start of libvips' public VipsRegion struct (VipsObject, then `im`, then the `valid`
   rectangle): its offset is passed in, computed from the instance size GObject reports for
   VipsObject, and checked by Python against a region it prepares.

   Nothing here calls Python; every function is thread-safe once vk_init has run. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <float.h>

/* float arithmetic in float (SSE), as numpy does it: x87 extended precision would change results */
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0
#error "the kernel needs FLT_EVAL_METHOD == 0"
#endif

#define VK_CHUNK 256
#define VK_BLOCK 32               /* colours of a cube block: along R, at one G and B */
#define VK_BLOCKS (1L << 24 >> 5) /* blocks of the cube: (R >> 5) | G << 3 | B << 11 */
#define VK_CUBE (1L << 24)
#define VK_FILLED (1u << 24) /* a cube entry's mark: filled (the system's zeros are not) */
#define VK_VERSION 10

/* SSSE3 versions of the luma and of the luma change (x86 with GCC or Clang), chosen at run time when
   the CPU has SSSE3 (vk_simd); the same integer arithmetic as the scalar loops, bit for bit. */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
#define VK_SSSE3 1
#endif

/* The libvips (and GLib) functions used, passed in by vk_init. */
typedef struct {
    void *(*image_new)(void);
    int (*pipelinev)(void *image, int hint, ...);
    int (*generate)(void *image, void *start, void *gen, void *stop, void *a, void *b);
    void *start_one;
    void *stop_one;
    int (*region_prepare)(void *region, const int *rect);
    void (*set_data_full)(void *object, const char *key, void *data, void (*destroy)(void *));
    void *(*object_ref)(void *object);
    void (*object_unref)(void *object);
    long valid_offset; /* of VipsRegion's `valid` rectangle (left, top, width, height) */
    long data_offset;  /* of its `data` pointer */
    long bpl_offset;   /* of its `bpl` (bytes per line) */
} vk_api;

static vk_api api;
static int api_ready = 0;

enum { OP_PAIRSUM = 1, OP_TOINDEX = 2, OP_COLUMNMIX = 3, OP_LUT = 4, OP_RECOMB = 5, OP_LUMA = 6, OP_BLEND = 7 };
/* BT.601 luma in fixed point, as methods/_hist.py (LUMA_WEIGHTS) and OpenCV's RGB2YCrCb */
static inline int luma_of(const uint8_t *px) { return (4899 * px[0] + 9617 * px[1] + 1868 * px[2] + 8192) >> 14; }
void vk_luma(const uint8_t *in, long npix, uint8_t *y);
/* The change of each luma value under a luma LUT: delta[v] = lut[v] - v, and (for the SSSE3 loop) its
   positive part in the low byte and its negative part in the high one. Built once per LUT: a program
   keeps its own (vk_run maps a libvips region a row at a time, often a few hundred pixels). */
typedef struct {
    int16_t delta[256];
    uint16_t pn[256];
} luma_change;
static void apply_change(const uint8_t *in, const uint8_t *y, long npix, const luma_change *c, uint8_t *out);
static void luma_change_init(luma_change *c, const uint8_t *lut);

/* what the chunk's pixels are between steps */
enum { S_RGB8 = 0, S_F32 = 1, S_U16 = 2, S_U8 = 3 };

/* One step, as Python passes it (tables are copied into the program). */
typedef struct {
    int kind;
    int rows;     /* table rows: 1 (every band) or 3 (one per band) */
    int n;        /* entries per row */
    int is_float; /* OP_LUT: float32 (1) or uint8 (0) entries */
    int source;   /* OP_COLUMNMIX: the band of the column term */
    double m[9];  /* OP_RECOMB */
    const void *t1, *t2;
} vk_step;

typedef struct {
    int kind, rows, n, is_float, source;
    double m[9];
    void *t1, *t2;
} op_t;

typedef struct {
    int nops;
    op_t *ops;
    uint32_t *cube;  /* NULL, or 2^24 packed RGB outputs indexed by R | G << 8 | B << 16 */
    int cube_ready;  /* pixels are looked up in the cube (vk_cube_ready) */
    uint8_t block[VK_BLOCKS]; /* per block, its VK_BLOCK entries: 0 not filled, 1 being filled, 2 filled */
    int refs;        /* the caller's, and one per image running the program */
} vk_program;

/* Set the functions once (later calls change nothing: images may be running). */
int vk_init(const vk_api *a) {
    if (!__atomic_load_n(&api_ready, __ATOMIC_ACQUIRE)) {
        api = *a;
        __atomic_store_n(&api_ready, 1, __ATOMIC_RELEASE);
    }
    return 0;
}

/* The layout Python must agree with: a version, and the sizes of the structs it fills. */
long vk_abi(void) { return VK_VERSION * 1000000L + (long)sizeof(vk_step) * 1000L + (long)sizeof(vk_api); }

static size_t table_bytes(const vk_step *s, int which) {
    switch (s->kind) {
    case OP_COLUMNMIX: /* (OP_PAIRSUM's tables are interleaved by vk_program_new itself) */
        return (size_t)3 * s->n * 4;
    case OP_LUT:
        return which == 1 ? (size_t)s->rows * s->n * (s->is_float ? 4 : 1) : 0;
    case OP_LUMA:
    case OP_BLEND:
        return which == 1 ? 256 : 0;
    default:
        return 0;
    }
}

static void program_free(vk_program *p) {
    for (int i = 0; i < p->nops; i++) {
        free(p->ops[i].t1);
        free(p->ops[i].t2);
    }
    free(p->ops);
    free(p->cube);
    free(p);
}

/* Drop a reference (the last frees the program). */
void vk_program_unref(vk_program *p) {
    if (p && __atomic_sub_fetch(&p->refs, 1, __ATOMIC_ACQ_REL) == 0)
        program_free(p);
}

vk_program *vk_program_new(const vk_step *steps, int nops) {
    vk_program *p = calloc(1, sizeof(vk_program));
    if (!p)
        return NULL;
    p->ops = calloc(nops > 0 ? nops : 1, sizeof(op_t));
    if (!p->ops) {
        free(p);
        return NULL;
    }
    p->nops = nops;
    p->refs = 1;
    int state = S_RGB8;
    for (int i = 0; i < nops; i++) {
        const vk_step *s = &steps[i];
        op_t *o = &p->ops[i];
        /* the tables must cover every index the step can meet: refuse a program that would read past one */
        int ok = 1;
        switch (s->kind) {
        case OP_PAIRSUM: ok = state == S_RGB8; state = S_F32; break;
        case OP_TOINDEX: ok = state == S_F32; state = S_U16; break;
        case OP_COLUMNMIX: ok = state == S_U16 && s->n == 65536 && s->source >= 0 && s->source < 3; state = S_F32; break;
        case OP_LUT:
            ok = state != S_F32 && (s->rows == 1 || s->rows == 3) && s->n == (state == S_U16 ? 65536 : 256);
            state = s->is_float ? S_F32 : S_U8;
            break;
        case OP_RECOMB: ok = state == S_F32; break;
        case OP_LUMA: ok = state == S_RGB8; state = S_U8; break;
        case OP_BLEND: ok = state == S_U8; break;
        default: ok = 0;
        }
        if (!ok || (s->kind != OP_TOINDEX && s->kind != OP_RECOMB && !s->t1) ||
            ((s->kind == OP_PAIRSUM || s->kind == OP_COLUMNMIX) && !s->t2)) {
            program_free(p);
            return NULL;
        }
        o->kind = s->kind;
        o->rows = s->rows;
        o->n = s->n;
        o->is_float = s->is_float;
        o->source = s->source;
        memcpy(o->m, s->m, sizeof(o->m));
        if (s->kind == OP_PAIRSUM) { /* (3, n) tables -> n entries of 4 floats: one cache line a pixel */
            float *t[2] = {malloc((size_t)16 * 65536), malloc((size_t)16 * 256)};
            o->t1 = t[0];
            o->t2 = t[1];
            if (!t[0] || !t[1]) {
                program_free(p);
                return NULL;
            }
            const float *src[2] = {s->t1, s->t2};
            int len[2] = {65536, 256};
            for (int k = 0; k < 2; k++)
                for (int j = 0; j < len[k]; j++) {
                    for (int c = 0; c < 3; c++)
                        t[k][4 * j + c] = src[k][c * len[k] + j];
                    t[k][4 * j + 3] = 0.0f;
                }
            continue;
        }
        const void *src[2] = {s->t1, s->t2};
        void **dst[2] = {&o->t1, &o->t2};
        for (int k = 0; k < 2; k++) { /* the step's tables, copied (the caller's may go) */
            size_t bytes = table_bytes(s, k + 1);
            if (!bytes)
                continue;
            if (!(*dst[k] = malloc(bytes))) {
                program_free(p);
                return NULL;
            }
            memcpy(*dst[k], src[k], bytes);
        }
        if (s->kind == OP_LUMA) { /* its change tables, for a program of this step alone (vk_run) */
            if (!(o->t2 = malloc(sizeof(luma_change)))) {
                program_free(p);
                return NULL;
            }
            luma_change_init(o->t2, o->t1);
        }
    }
    if (state != S_U8) { /* the output must be uchar RGB */
        program_free(p);
        return NULL;
    }
    return p;
}

static inline uint16_t to_index(float v) {
    /* libvips' cast float -> ushort: truncated towards zero, clipped (NaN -> 0) */
    if (!(v > 0.0f))
        return 0;
    if (v >= 65535.0f)
        return 65535;
    return (uint16_t)v;
}

/* Run the program on n <= VK_CHUNK interleaved RGB pixels `in`, writing interleaved RGB `out`. */
static void run_chunk(const vk_program *p, const uint8_t *in, uint8_t *out, int n) {
    float f[3][VK_CHUNK];
    uint16_t u[3][VK_CHUNK];
    uint8_t b[3][VK_CHUNK];
    int state = S_RGB8;
    for (int k = 0; k < p->nops; k++) {
        const op_t *o = &p->ops[k];
        switch (o->kind) {
        case OP_PAIRSUM: {
            const float *rg = o->t1, *bt = o->t2; /* interleaved: 4 floats an entry */
            for (int i = 0; i < n; i++) {
                uint16_t pair;
                memcpy(&pair, in + 3 * i, 2); /* the bytes R, G read as one ushort, as the pipeline */
                const float *x = rg + 4 * (size_t)pair, *z = bt + 4 * in[3 * i + 2];
                f[0][i] = x[0] + z[0];
                f[1][i] = x[1] + z[1];
                f[2][i] = x[2] + z[2];
            }
            state = S_F32;
            break;
        }
        case OP_TOINDEX:
            for (int c = 0; c < 3; c++)
                for (int i = 0; i < n; i++)
                    u[c][i] = to_index(f[c][i]);
            state = S_U16;
            break;
        case OP_COLUMNMIX: {
            const float *d = o->t1, *col = o->t2;
            int m = o->n, s = o->source;
            for (int c = 0; c < 3; c++)
                for (int i = 0; i < n; i++)
                    f[c][i] = d[c * m + u[c][i]] + col[c * m + u[s][i]];
            state = S_F32;
            break;
        }
        case OP_LUT: {
            int m = o->n;
/* dst[c][i] = t[index of pixel i, band c], from whatever the pixels are now */
#define LOOKUP(dst, t)                                                                                  \
    if (state == S_U16)                                                                                 \
        for (int i = 0; i < n; i++)                                                                     \
            dst[c][i] = t[u[c][i]];                                                                     \
    else if (state == S_U8)                                                                             \
        for (int i = 0; i < n; i++)                                                                     \
            dst[c][i] = t[b[c][i]];                                                                     \
    else                                                                                                \
        for (int i = 0; i < n; i++)                                                                     \
            dst[c][i] = t[in[3 * i + c]];
            for (int c = 0; c < 3; c++) {
                int row = (o->rows == 1 ? 0 : c) * m;
                if (o->is_float) {
                    const float *t = (const float *)o->t1 + row;
                    LOOKUP(f, t)
                } else {
                    const uint8_t *t = (const uint8_t *)o->t1 + row;
                    LOOKUP(b, t)
                }
            }
#undef LOOKUP
            state = o->is_float ? S_F32 : S_U8;
            break;
        }
        case OP_RECOMB: {
            const double *m = o->m;
            for (int i = 0; i < n; i++) {
                double x0 = f[0][i], x1 = f[1][i], x2 = f[2][i];
                for (int c = 0; c < 3; c++) {
                    double acc = x0 * m[3 * c];
                    acc += x1 * m[3 * c + 1];
                    acc += x2 * m[3 * c + 2];
                    f[c][i] = (float)acc;
                }
            }
            state = S_F32;
            break;
        }
        case OP_LUMA: {
            const uint8_t *lut = o->t1;
            for (int i = 0; i < n; i++) {
                const uint8_t *px = in + 3 * i;
                int y = luma_of(px);
                int delta = (int)lut[y] - y;
                for (int c = 0; c < 3; c++) {
                    int v = px[c] + delta;
                    b[c][i] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
                }
            }
            state = S_U8;
            break;
        }
        case OP_BLEND: {
            const uint8_t *wt = o->t1;
            for (int i = 0; i < n; i++) {
                const uint8_t *px = in + 3 * i;
                int darkest = px[0] < px[1] ? px[0] : px[1];
                darkest = darkest < px[2] ? darkest : px[2];
                int w = wt[darkest];
                for (int c = 0; c < 3; c++)
                    b[c][i] = (uint8_t)((w * b[c][i] + (255 - w) * px[c] + 128) / 255);
            }
            state = S_U8;
            break;
        }
        }
    }
    for (int i = 0; i < n; i++)
        for (int c = 0; c < 3; c++)
            out[3 * i + c] = b[c][i];
}

/* The block of the colour at `at` (R | G << 8 | B << 16) in the cube. */
static inline long cube_block(long at) { return (at & 0xff) >> 5 | at >> 8 << 3; }

/* Fill the cube's VK_BLOCK entries of block `k`: R = (k & 7) * 32 + 0..31 at G = (k >> 3) & 255 and
   B = k >> 11. */
static void cube_fill(vk_program *p, long k) {
    uint8_t in[3 * VK_BLOCK], out[3 * VK_BLOCK];
    int r0 = (int)(k & 7) << 5, g = (int)(k >> 3 & 0xff), b = (int)(k >> 11);
    uint32_t *cube = p->cube + (r0 | g << 8 | (long)b << 16);
    for (int i = 0; i < VK_BLOCK; i++) {
        in[3 * i] = (uint8_t)(r0 + i);
        in[3 * i + 1] = (uint8_t)g;
        in[3 * i + 2] = (uint8_t)b;
    }
    run_chunk(p, in, out, VK_BLOCK);
    for (int i = 0; i < VK_BLOCK; i++) /* (VK_FILLED marks the entry: lookups need not ask the block) */
        __atomic_store_n(&cube[i], out[3 * i] | out[3 * i + 1] << 8 | (uint32_t)out[3 * i + 2] << 16 | VK_FILLED,
                         __ATOMIC_RELAXED);
}

/* Fill the block `b` (cube_block) if no thread has started it: 1 when it is filled now, 0 when another
   thread is filling it (or was, in the parent of a forked process: such a block stays unfilled, and
   its pixels are computed one by one, never waited for). */
static int fill_block(vk_program *p, long b) {
    uint8_t expected = 0;
    if (!__atomic_compare_exchange_n(&p->block[b], &expected, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return expected == 2;
    cube_fill(p, b);
    __atomic_store_n(&p->block[b], 2, __ATOMIC_RELEASE);
    return 1;
}

/* Run the program on `npix` interleaved RGB pixels (the numpy path). Through the cube, once the
   program has one, filling the blocks of the colours met as they come; a pixel whose block another
   thread is filling is computed directly (no thread ever waits for another). */
void vk_run(const vk_program *cp, const uint8_t *in, uint8_t *out, long npix) {
    vk_program *p = (vk_program *)cp; /* (the cube is a cache: filled as pixels need it) */
    if (p->nops == 1 && p->ops[0].kind == OP_LUMA) { /* the luma's change alone: no cube needed */
        apply_change(in, NULL, npix, p->ops[0].t2, out);
        return;
    }
    if (__atomic_load_n(&p->cube_ready, __ATOMIC_ACQUIRE)) { /* (a program may gain its cube while running) */
        uint32_t *cube = p->cube;
        for (long i = 0; i < npix; i++) {
            const uint8_t *px = in + 3 * i;
            long at = px[0] | px[1] << 8 | px[2] << 16;
            uint32_t v = __atomic_load_n(&cube[at], __ATOMIC_RELAXED);
            if (__builtin_expect(!(v & VK_FILLED), 0)) { /* its block not filled yet (or being filled) */
                if (!fill_block(p, cube_block(at))) {
                    run_chunk(p, px, out + 3 * i, 1);
                    continue;
                }
                v = __atomic_load_n(&cube[at], __ATOMIC_RELAXED);
            }
            out[3 * i] = v & 0xff;
            out[3 * i + 1] = (v >> 8) & 0xff;
            out[3 * i + 2] = (v >> 16) & 0xff; /* (not the mark) */
        }
        return;
    }
    for (long start = 0; start < npix; start += VK_CHUNK) {
        int n = npix - start < VK_CHUNK ? (int)(npix - start) : VK_CHUNK;
        run_chunk(p, in + 3 * start, out + 3 * start, n);
    }
}

/* Give the program a cube: 64 MiB of address space, zeroed by the system page by page as blocks are
   filled (only the colours an image shows cost time and memory). 0 on success. */
int vk_cube_alloc(vk_program *p) {
    if (!p->cube)
        p->cube = calloc(VK_CUBE, 4);
    return p->cube ? 0 : -1;
}

/* Look pixels up in the cube from now on. */
void vk_cube_ready(vk_program *p) {
    if (p->cube)
        __atomic_store_n(&p->cube_ready, 1, __ATOMIC_RELEASE);
}

/* Tests: set a block's state (1: as if a thread had started filling it and vanished, as in the child
   of a fork made meanwhile). */
void vk_cube_mark(vk_program *p, int b, int state) {
    __atomic_store_n(&p->block[b & (VK_BLOCKS - 1)], (uint8_t)state, __ATOMIC_RELEASE);
}

/* How many blocks of the cube are filled (tests, and what a cube costs). */
int vk_cube_blocks(const vk_program *p) {
    int n = 0;
    for (long b = 0; b < VK_BLOCKS; b++)
        n += __atomic_load_n(&p->block[b], __ATOMIC_ACQUIRE) == 2;
    return n;
}

/* --- counting and small maps on numpy arrays (the fits of tiles and patches) -------------------- */

/* The brightest and darkest channel of an RGB pixel. */
static inline void max_min(const uint8_t *px, int *mx, int *mn) {
    int hi = px[0] > px[1] ? px[0] : px[1], lo = px[0] < px[1] ? px[0] : px[1];
    *mx = hi > px[2] ? hi : px[2];
    *mn = lo < px[2] ? lo : px[2];
}

/* keep[i] = 1 where pixel i counts as tissue, else 0 (sampling.py's _tissue_pixels_array): rule 0,
   saturation: (max - min) > max * threshold, in float32 as numpy computes it; rule 1, intensity: the
   darkest channel < threshold, in float32; grey (`bands` 1): the value < threshold, in float64. */
void vk_tissue(const uint8_t *in, int bands, long npix, int rule, double threshold64, uint8_t *keep) {
    float threshold = (float)threshold64;
    for (long i = 0; i < npix; i++) {
        const uint8_t *px = in + (size_t)bands * i;
        if (bands == 1) { /* (numpy compares the uint8 values with the threshold in float64) */
            keep[i] = (double)px[0] < threshold64;
            continue;
        }
        int mx, mn;
        max_min(px, &mx, &mn);
        if (rule == 0) {
            float product = (float)mx * threshold; /* (rounded to float32 before the comparison) */
            keep[i] = (float)(mx - mn) > product;
        } else {
            keep[i] = (float)mn < threshold;
        }
    }
}

/* The tissue mask's counts over an RGB overview (sampling.tissue_mask): pairs[(chroma << 8) | max] for
   every pixel (chroma = max - min of its channels), and spread[chroma] for the pixels whose min is below
   `dark_below` (what could be tissue). Both added to. */
void vk_pair_counts(const uint8_t *in, long npix, int dark_below, int64_t *pairs, int64_t *spread) {
    for (long i = 0; i < npix; i++) {
        const uint8_t *px = in + 3 * (size_t)i;
        int mx, mn;
        max_min(px, &mx, &mn);
        pairs[((mx - mn) << 8) | mx]++;
        if (mn < dark_below)
            spread[mx - mn]++;
    }
}

/* keep[i] = table[(chroma << 8) | max] of pixel i (table: 65536 bytes, one a pair). */
void vk_pair_mask(const uint8_t *in, long npix, const uint8_t *table, uint8_t *keep) {
    for (long i = 0; i < npix; i++) {
        const uint8_t *px = in + 3 * (size_t)i;
        int mx, mn;
        max_min(px, &mx, &mn);
        keep[i] = table[((mx - mn) << 8) | mx];
    }
}

/* (4, 256) R, G, B and luma counts of the pixels where keep[i] (keep NULL: every pixel) of `bands`
   1 or 3 (grey: the value in all four rows), added to `out`. */
void vk_histograms(const uint8_t *in, int bands, long npix, const uint8_t *keep, int64_t *out) {
    for (long i = 0; i < npix; i++) {
        if (keep && !keep[i])
            continue;
        const uint8_t *px = in + (size_t)bands * i;
        if (bands == 1) {
            out[px[0]]++;
            out[256 + px[0]]++;
            out[512 + px[0]]++;
            out[768 + px[0]]++;
        } else {
            out[px[0]]++;
            out[256 + px[1]]++;
            out[512 + px[2]]++;
            out[768 + luma_of(px)]++;
        }
    }
}

/* --- SSSE3: 16 pixels at a time -------------------------------------------------------------- */

static int simd_state = -1; /* -1: not decided yet; 0: scalar; 1: SSSE3 */

static int simd_on(void) {
    int state = __atomic_load_n(&simd_state, __ATOMIC_RELAXED);
    if (state < 0) {
#ifdef VK_SSSE3
        __builtin_cpu_init();
        state = __builtin_cpu_supports("ssse3") ? 1 : 0;
#else
        state = 0;
#endif
        __atomic_store_n(&simd_state, state, __ATOMIC_RELAXED);
    }
    return state;
}

/* Tests: 0 switches the SSSE3 loops off, 1 back on where the CPU has SSSE3. Returns whether they are on. */
int vk_simd(int on) {
    __atomic_store_n(&simd_state, on ? -1 : 0, __ATOMIC_RELAXED);
    return simd_on();
}

#ifdef VK_SSSE3
/* The luma of the first pixels of `in`, 16 at a time: y = (4899 R + 9617 G + 1868 B + 8192) >> 14 as
   luma_of, from (R, G) and (B, 0) 16-bit pairs multiplied and added in 32 bits. Each 16-byte load
   covers 4 pixels and reads 4 bytes past them, so it stops 2 pixels before the end. Returns how many
   pixels it did (the rest are the caller's). */
__attribute__((target("ssse3"))) static long luma_ssse3(const uint8_t *in, long npix, uint8_t *y) {
    const __m128i rg = _mm_setr_epi8(0, -1, 1, -1, 3, -1, 4, -1, 6, -1, 7, -1, 9, -1, 10, -1);
    const __m128i b = _mm_setr_epi8(2, -1, -1, -1, 5, -1, -1, -1, 8, -1, -1, -1, 11, -1, -1, -1);
    const __m128i w_rg = _mm_setr_epi16(4899, 9617, 4899, 9617, 4899, 9617, 4899, 9617);
    const __m128i w_b = _mm_setr_epi16(1868, 0, 1868, 0, 1868, 0, 1868, 0);
    const __m128i half = _mm_set1_epi32(8192);
    long i = 0;
    for (; i + 18 <= npix; i += 16) {
        const uint8_t *p = in + 3 * i;
        __m128i q[4];
        for (int k = 0; k < 4; k++) {
            __m128i v = _mm_loadu_si128((const __m128i *)(p + 12 * k));
            __m128i sum = _mm_add_epi32(_mm_madd_epi16(_mm_shuffle_epi8(v, rg), w_rg), _mm_madd_epi16(_mm_shuffle_epi8(v, b), w_b));
            q[k] = _mm_srli_epi32(_mm_add_epi32(sum, half), 14);
        }
        _mm_storeu_si128((__m128i *)(y + i), _mm_packus_epi16(_mm_packs_epi32(q[0], q[1]), _mm_packs_epi32(q[2], q[3])));
    }
    return i;
}

/* out = clip(in + change) band by band for the first pixels, 16 at a time, the change of pixel i being
   pn[y[i]]: its positive part in the low byte, its negative part in the high one (one of them 0), so
   that a saturating add then a saturating subtract clip it as the scalar loop does. `out` may be `in`
   (each 16 pixels are read before they are written). Returns how many pixels it did. */
__attribute__((target("ssse3"))) static long change_ssse3(const uint8_t *in, const uint8_t *y, long npix,
                                                          const uint16_t *pn, uint8_t *out) {
    const __m128i e0 = _mm_setr_epi8(0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5);
    const __m128i e1 = _mm_setr_epi8(5, 5, 6, 6, 6, 7, 7, 7, 8, 8, 8, 9, 9, 9, 10, 10);
    const __m128i e2 = _mm_setr_epi8(10, 11, 11, 11, 12, 12, 12, 13, 13, 13, 14, 14, 14, 15, 15, 15);
    const __m128i low = _mm_set1_epi16(0xff);
    uint16_t d[16];
    long i = 0;
    for (; i + 16 <= npix; i += 16) {
        for (int k = 0; k < 16; k++)
            d[k] = pn[y[i + k]];
        __m128i d0 = _mm_loadu_si128((const __m128i *)d), d1 = _mm_loadu_si128((const __m128i *)(d + 8));
        __m128i pos = _mm_packus_epi16(_mm_and_si128(d0, low), _mm_and_si128(d1, low));
        __m128i neg = _mm_packus_epi16(_mm_srli_epi16(d0, 8), _mm_srli_epi16(d1, 8));
        const uint8_t *p = in + 3 * i;
        uint8_t *q = out + 3 * i;
        __m128i a0 = _mm_loadu_si128((const __m128i *)p);
        __m128i a1 = _mm_loadu_si128((const __m128i *)(p + 16));
        __m128i a2 = _mm_loadu_si128((const __m128i *)(p + 32));
        a0 = _mm_subs_epu8(_mm_adds_epu8(a0, _mm_shuffle_epi8(pos, e0)), _mm_shuffle_epi8(neg, e0));
        a1 = _mm_subs_epu8(_mm_adds_epu8(a1, _mm_shuffle_epi8(pos, e1)), _mm_shuffle_epi8(neg, e1));
        a2 = _mm_subs_epu8(_mm_adds_epu8(a2, _mm_shuffle_epi8(pos, e2)), _mm_shuffle_epi8(neg, e2));
        _mm_storeu_si128((__m128i *)q, a0);
        _mm_storeu_si128((__m128i *)(q + 16), a1);
        _mm_storeu_si128((__m128i *)(q + 32), a2);
    }
    return i;
}
#endif

/* Counts of each band of `bands`-band pixels ((bands, 256), added to `out`), or of their luma (256)
   when `luma` (bands 3), whose values are also written to `y` if not NULL. Two tables (four for the
   luma), for alternate pixels, so that a run of one value does not wait on its own previous increment. */
void vk_counts(const uint8_t *in, int bands, long npix, int luma, int64_t *out, uint8_t *y) {
    if (luma) { /* the luma of a block (SSSE3 where it can), then counted in four tables */
        uint64_t h4[4][256];
        uint8_t block[1024];
        memset(h4, 0, sizeof(h4));
        for (long start = 0; start < npix; start += 1024) {
            long n = npix - start < 1024 ? npix - start : 1024;
            uint8_t *t = y ? y + start : block;
            vk_luma(in + 3 * start, n, t);
            long k = 0;
            for (; k + 4 <= n; k += 4) {
                h4[0][t[k]]++;
                h4[1][t[k + 1]]++;
                h4[2][t[k + 2]]++;
                h4[3][t[k + 3]]++;
            }
            for (; k < n; k++)
                h4[0][t[k]]++;
        }
        for (int v = 0; v < 256; v++)
            out[v] += (int64_t)(h4[0][v] + h4[1][v] + h4[2][v] + h4[3][v]);
        return;
    }
    uint64_t h[2][768];
    memset(h, 0, sizeof(h));
    if (bands == 3) {
        for (long i = 0; i < npix; i++) {
            const uint8_t *px = in + 3 * i;
            uint64_t *t = h[i & 1];
            t[px[0]]++;
            t[256 + px[1]]++;
            t[512 + px[2]]++;
        }
    } else {
        for (long i = 0; i < npix; i++)
            h[i & 1][in[i]]++;
    }
    for (int v = 0; v < 256 * bands; v++)
        out[v] += (int64_t)(h[0][v] + h[1][v]);
}

/* out = luts[b][in] band by band ((rows, 256) luts: one row for every band, or one per band). */
void vk_apply_luts(const uint8_t *in, int bands, long npix, const uint8_t *luts, int rows, uint8_t *out) {
    if (bands == 3) {
        const uint8_t *l0 = luts, *l1 = luts + (rows == 1 ? 0 : 256), *l2 = luts + (rows == 1 ? 0 : 512);
        for (long i = 0; i < npix; i++) {
            out[3 * i] = l0[in[3 * i]];
            out[3 * i + 1] = l1[in[3 * i + 1]];
            out[3 * i + 2] = l2[in[3 * i + 2]];
        }
        return;
    }
    for (long i = 0; i < npix * bands; i++)
        out[i] = luts[in[i]];
}

/* The change tables of a luma LUT (see luma_change). */
static void luma_change_init(luma_change *c, const uint8_t *lut) {
    for (int v = 0; v < 256; v++) {
        int d = (int)lut[v] - v;
        c->delta[v] = (int16_t)d;
        c->pn[v] = (uint16_t)(d > 0 ? d : (-d) << 8);
    }
}

static inline uint8_t clamp255(int v) { return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v); }

/* out = clip(rgb + change) with y the luma of each RGB pixel (given, or computed if NULL). */
static void apply_change(const uint8_t *in, const uint8_t *y, long npix, const luma_change *c, uint8_t *out) {
    long i = 0;
#ifdef VK_SSSE3
    if (npix >= 16 && simd_on()) {
        if (y) {
            i = change_ssse3(in, y, npix, c->pn, out);
        } else { /* the luma of a block, then its change (in place too: the block is read first) */
            uint8_t block[1024];
            while (npix - i >= 16) {
                long n = npix - i < 1024 ? npix - i : 1024;
                long done = luma_ssse3(in + 3 * i, n, block);
                for (long k = done; k < n; k++)
                    block[k] = (uint8_t)luma_of(in + 3 * (i + k));
                i += change_ssse3(in + 3 * i, block, n, c->pn, out + 3 * i);
            }
        }
    }
#endif
    for (; i < npix; i++) {
        const uint8_t *px = in + 3 * i;
        int d = c->delta[y ? y[i] : luma_of(px)];
        out[3 * i] = clamp255(px[0] + d);
        out[3 * i + 1] = clamp255(px[1] + d);
        out[3 * i + 2] = clamp255(px[2] + d);
    }
}

/* out = clip(rgb + lut[y] - y) with y the luma of each RGB pixel (given, or computed if NULL). */
void vk_apply_luma(const uint8_t *in, const uint8_t *y, long npix, const uint8_t *lut, uint8_t *out) {
    luma_change c;
    luma_change_init(&c, lut);
    apply_change(in, y, npix, &c, out);
}

/* y = the luma of each RGB pixel. */
void vk_luma(const uint8_t *in, long npix, uint8_t *y) {
    long i = 0;
#ifdef VK_SSSE3
    if (simd_on())
        i = luma_ssse3(in, npix, y);
#endif
    for (; i < npix; i++)
        y[i] = (uint8_t)luma_of(in + 3 * i);
}

/* Luminance equalization of `npix` RGB pixels fitted on themselves (equalize.py's fit_apply_array):
   the luma's histogram (the luma kept in `y`), OpenCV's equalization LUT of it in float64 as
   equalize_lut computes it, and the luma's change added to every band (apply_luma). Returns how many
   luma values occur: with one or none the LUT is the identity (and `out` the input). */
int vk_equalize_luma(const uint8_t *in, long npix, uint8_t *y, uint8_t *out) {
    int64_t counts[256] = {0};
    vk_counts(in, 3, npix, 1, counts, y);
    int present = 0, first = -1;
    for (int v = 0; v < 256; v++) {
        if (counts[v]) {
            present++;
            if (first < 0)
                first = v;
        }
    }
    uint8_t lut[256];
    if (present <= 1) {
        for (int v = 0; v < 256; v++)
            lut[v] = (uint8_t)v;
    } else {
        double cdf = 0.0, total = (double)npix, low = (double)counts[first];
        for (int v = 0; v < 256; v++) {
            cdf += (double)counts[v];
            double e = floor((cdf - low) / (total - low) * 255.0 + 0.5);
            lut[v] = (uint8_t)(e < 0.0 ? 0 : e > 255.0 ? 255 : (int)e);
        }
    }
    vk_apply_luma(in, y, npix, lut, out);
    return present;
}

/* CLAHE's region counts (clahe.py's _region_histograms_array): out[((c * rows + r) * cols + q) * 256 +
   v] counts value v of channel c in region (row r, column q) of the `channels`-band (h, w) planes read
   through the padded grid: padded row y is source row ys[y] (rows * th of them), padded column x is
   source column xs[x] (cols * tw of them), as BORDER_REFLECT_101 pads. */
void vk_region_counts(const uint8_t *planes, int width, int channels, int cols, int rows, int tw, int th,
                      const int32_t *ys, const int32_t *xs, int64_t *out) {
    size_t plane = (size_t)rows * cols * 256; /* one channel's counts */
    for (int y = 0; y < rows * th; y++) {
        const uint8_t *row = planes + (size_t)ys[y] * width * channels;
        int64_t *region_row = out + (size_t)(y / th) * cols * 256;
        for (int q = 0; q < cols; q++) {
            int64_t *h = region_row + (size_t)q * 256;
            const int32_t *x = xs + (size_t)q * tw, *end = x + tw;
            if (channels == 1) {
                for (; x < end; x++)
                    h[row[*x]]++;
            } else {
                for (; x < end; x++) {
                    const uint8_t *px = row + (size_t)*x * channels;
                    for (int c = 0; c < channels; c++)
                        h[c * plane + px[c]]++;
                }
            }
        }
    }
}

/* OpenCV's clipped-equalization LUTs of `regions` 256-bin histograms (clahe.py's clahe_luts): each bin
   clipped at `clip` (0: none), the excess spread evenly and its remainder one count every 256 / r bins
   from 0; then round_half_even(float32(cumulative count) * scale) clipped to 0..255, in float32. */
void vk_clahe_luts(const int64_t *hist, long regions, long clip, float scale, uint8_t *out) {
    for (long k = 0; k < regions; k++) {
        const int64_t *h = hist + k * 256;
        int64_t c[256], excess = 0;
        for (int i = 0; i < 256; i++) {
            c[i] = clip > 0 && h[i] > clip ? clip : h[i];
            excess += h[i] - c[i];
        }
        if (clip > 0) {
            int64_t batch = excess / 256, residual = excess % 256;
            for (int i = 0; i < 256; i++)
                c[i] += batch;
            /* one more count every 256 / residual bins from 0, `residual` of them */
            for (int64_t j = 0, step = residual ? 256 / residual : 256; j < residual; j++)
                c[j * step]++;
        }
        int64_t cum = 0;
        for (int i = 0; i < 256; i++) {
            cum += c[i];
            float v = (float)cum * scale;
            v = (v + 0x1p23f) - 0x1p23f; /* rint, half to even (0 <= v < 2^23) */
            out[k * 256 + i] = (uint8_t)(v < 0.0f ? 0 : v > 255.0f ? 255 : (int)v); /* (numpy's clip) */
        }
    }
}

/* out = clip(rgb + new - old) band by band, for the new and old values (luma) of each RGB pixel. */
void vk_add_change(const uint8_t *in, const uint8_t *new_, const uint8_t *old, long npix, uint8_t *out) {
    uint8_t clip[1021]; /* clip[v + 510] for v in -510 .. 510 (no branches) */
    for (int v = 0; v < 1021; v++)
        clip[v] = (uint8_t)(v < 510 ? 0 : v > 765 ? 255 : v - 510);
    for (long i = 0; i < npix; i++) {
        const uint8_t *c = clip + 510 + (int)new_[i] - (int)old[i]; /* c[v] = clip[v + delta + 510] */
        out[3 * i] = c[in[3 * i]];
        out[3 * i + 1] = c[in[3 * i + 1]];
        out[3 * i + 2] = c[in[3 * i + 2]];
    }
}

/* CLAHE's bilinear interpolation of region LUTs (clahe.py's _map_array, OpenCV's arithmetic in its
   order, in float32): for each of the `width` values of each of the `height` rows of `plane`, the four
   LUT entries table[row_base{1,2}[y] + col_base{1,2}[x] + value], weighted across by xa1/xa and down
   by ya1/ya, rounded half to even (a convex combination of LUT values: 0 to 255). */
void vk_clahe_map(const uint8_t *plane, int height, int width, const float *table, const int32_t *row1,
                  const int32_t *row2, const int32_t *col1, const int32_t *col2, const float *xa1,
                  const float *xa, const float *ya1, const float *ya, uint8_t *out) {
    for (int y = 0; y < height; y++) {
        const uint8_t *v = plane + (size_t)y * width;
        uint8_t *o = out + (size_t)y * width;
        const float *top = table + row1[y], *bottom = table + row2[y];
        float wt = ya1[y], wb = ya[y];
        for (int x = 0; x < width; x++) {
            int a = col1[x] + v[x], b = col2[x] + v[x];
            float t = top[a] * xa1[x];
            float u = top[b] * xa[x];
            t += u;
            float d = bottom[a] * xa1[x];
            u = bottom[b] * xa[x];
            d += u;
            t *= wt;
            d *= wb;
            t += d;
            /* rint for 0 <= t < 2^23: adding and taking 2^23 rounds to an integer, half to even */
            o[x] = (uint8_t)(int)((t + 0x1p23f) - 0x1p23f);
        }
    }
}

/* --- the libvips image ------------------------------------------------------------------------ */

/* VIPS_REGION_ADDR of a region of 3-byte pixels */
static inline uint8_t *region_addr(void *region, int x, int y) {
    const int *valid = (const int *)((char *)region + api.valid_offset);
    uint8_t *data = *(uint8_t **)((char *)region + api.data_offset);
    int bpl = *(const int *)((char *)region + api.bpl_offset);
    return data + (long)(y - valid[1]) * bpl + (long)(x - valid[0]) * 3;
}

static int generate(void *out_region, void *seq, void *a, void *b, int *stop) {
    const vk_program *p = b;
    const int *valid = (const int *)((char *)out_region + api.valid_offset); /* left, top, width, height */
    int rect[4] = {valid[0], valid[1], valid[2], valid[3]};
    (void)a;
    (void)stop;
    if (api.region_prepare(seq, rect))
        return -1;
    for (int y = 0; y < rect[3]; y++) {
        const uint8_t *in = region_addr(seq, rect[0], rect[1] + y);
        uint8_t *out = region_addr(out_region, rect[0], rect[1] + y);
        vk_run(p, in, out, rect[2]);
    }
    return 0;
}

static void unref_program(void *p) { vk_program_unref(p); }

/* A new image with the fields of `in`, whose pixels `gen` makes (with `in` and `b`); it holds a
   reference to `in`. NULL on failure. */
static void *image_of(void *in, int demand, void *gen, void *b) {
    void *out = api.image_new();
    if (!out)
        return NULL;
    if (api.pipelinev(out, demand, in, (void *)NULL)) {
        api.object_unref(out);
        return NULL;
    }
    api.set_data_full(out, "vipsnorm-input", api.object_ref(in), api.object_unref);
    if (api.generate(out, api.start_one, gen, api.stop_one, in, b)) {
        api.object_unref(out);
        return NULL;
    }
    return out;
}

/* A new image: `program` run lazily on `in` (uchar RGB, checked by the caller); the image holds a
   reference to the program and to `in`. `demand`: libvips' VIPS_DEMAND_STYLE_THINSTRIP, as its own
   point operations. NULL on failure. */
void *vk_image(void *in, vk_program *program, int demand) {
    if (!api_ready)
        return NULL;
    void *out = image_of(in, demand, (void *)generate, program);
    if (!out)
        return NULL;
    __atomic_add_fetch(&program->refs, 1, __ATOMIC_ACQ_REL);
    api.set_data_full(out, "vipsnorm-program", program, unref_program);
    return out;
}

/* --- a pixel source: a level whose tiles another library decodes -------------------------------- */

/* Reads the window (x, y, w, h) into out (rows stride bytes apart); 0 on success. */
typedef int (*vk_read_fn)(void *ctx, int x, int y, int w, int h, uint8_t *out, long stride);

typedef struct {
    vk_read_fn read;
    void *ctx;
    void (*destroy)(void *ctx);
} vk_source_t;

static void free_source(void *pointer) {
    vk_source_t *source = pointer;
    if (source->destroy)
        source->destroy(source->ctx);
    free(source);
}

static int source_generate(void *out_region, void *seq, void *a, void *b, int *stop) {
    const vk_source_t *source = b;
    const int *valid = (const int *)((char *)out_region + api.valid_offset);
    int rect[4] = {valid[0], valid[1], valid[2], valid[3]};
    int bpl = *(const int *)((char *)out_region + api.bpl_offset);
    (void)a;
    (void)stop;
    if (source->read(source->ctx, rect[0], rect[1], rect[2], rect[3], region_addr(out_region, rect[0], rect[1]), bpl) == 0)
        return 0;
    /* not decodable here (damaged, say): libvips' own loader gives the pixels, or its error */
    if (api.region_prepare(seq, rect))
        return -1;
    for (int y = 0; y < rect[3]; y++)
        memcpy(region_addr(out_region, rect[0], rect[1] + y), region_addr(seq, rect[0], rect[1] + y), (size_t)rect[2] * 3);
    return 0;
}

/* A new image with the size, fields and metadata of `in` (uchar RGB, checked by the caller), whose pixels
   `read` gives, and `in` where it fails. The image owns `ctx` (`destroy` frees it) and holds a reference
   to `in`. `demand`: libvips' VIPS_DEMAND_STYLE_SMALLTILE. NULL on failure (`ctx` then destroyed). */
void *vk_source(void *in, vk_read_fn read, void *ctx, void (*destroy)(void *), int demand) {
    vk_source_t *source = api_ready ? malloc(sizeof *source) : NULL;
    if (!source) {
        if (destroy)
            destroy(ctx);
        return NULL;
    }
    source->read = read;
    source->ctx = ctx;
    source->destroy = destroy;
    void *out = image_of(in, demand, (void *)source_generate, source);
    if (!out) {
        free_source(source);
        return NULL;
    }
    api.set_data_full(out, "vipsnorm-source", source, free_source);
    return out;
}

/* --- a Python module, so that setuptools builds and installs this file as one ------------------- */

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel",
                                    "vipsnorm's native colour kernel; loaded with ctypes by vipsnorm._native.", -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&module); }
