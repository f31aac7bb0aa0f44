/* AMX tiles for bfloat16 (included by native_kernel.c): both products as tile dot products with fp32
 * accumulation, on CPUs with AMX-BF16 whose kernel grants the tile state (Linux arch_prctl).
 *
 * Scores: C(16 keys x 16 rows) += A(K chunk, 16 keys x 32 d, read from the cache) . B(Q^T pairs).
 * Values: C(16 rows x 16 d) += A(P, 16 rows x 32 keys, the transposed probabilities in bf16) . B(V pairs),
 * per 16 dimensions, in tiles that hold the output across chunks. */
#ifndef LONGATTN_NATIVE_AMX_H
#define LONGATTN_NATIVE_AMX_H
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#define LONGATTN_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

/* Asks Linux for the AMX tile state of this process (once; 0 when granted). */
static int amx_request(void) {
    static int state = -1; /* -1: not asked, 0: granted, 1: refused */
    if (state < 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) ? 1 : 0;
    return state == 0;
}

/* GCC's tile intrinsics are asm statements without a memory clobber: the compiler does not see that tile loads
 * read (and tile stores write) the buffers, and may drop or move those accesses. Every tile load and store
 * sits between barriers. */
#define TILE_FENCE() __asm__ volatile("" ::: "memory")

typedef struct {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) TileConfig;

/* Per work item: the tile configuration is per thread, and torch's own AMX kernels may change it between. */
static inline void amx_configure(void) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.colsb[t] = 64, c.rows[t] = 16; /* 16 x 64 bytes each (see tile_amx) */
    TILE_FENCE();
    _tile_loadconfig(&c);
}

/* 2^x to ~1e-4 relative (a degree-3 polynomial on |r| <= 1/2): below the bf16 rounding the probabilities get
 * before P . V, at half the cost of exp16. Hidden entries are zeroed by the caller's mask. */
static inline __m512 exp2_bf16(__m512 x) {
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(x, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(5.5504109e-2f), r, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* r[i] <- column i of the 16 x 16 matrix whose rows are r[0..15]. */
static inline void transpose16(__m512 *r) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 4; j++) {
            t[8 * h + j] = _mm512_shuffle_f32x4(r[8 * h + j], r[8 * h + j + 4], 0x88);
            t[8 * h + j + 4] = _mm512_shuffle_f32x4(r[8 * h + j], r[8 * h + j + 4], 0xDD);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
    }
}

/* O tiles 3..6 hold OL[row][16 z .. 16 z + 15] (D / 16 of them): stored, reloaded, accumulated by tile number. */
#define FOR_O_TILES(D, X) do { X(0, 3); if ((D) > 16) X(1, 4); if ((D) > 32) { X(2, 5); X(3, 6); } } while (0)
#define O_STORE(z, n) do { _tile_stored(n, OL + 16 * (z), D * 4); TILE_FENCE(); } while (0)
#define O_LOAD(z, n) do { TILE_FENCE(); _tile_loadd(n, OL + 16 * (z), D * 4); } while (0)
#define O_ZERO(z, n) _tile_zero(n)
#define O_DOT(z, n) do { TILE_FENCE(); _tile_loadd(1, VP + 16 * (z), D * 4); _tile_dpbf16ps(n, 7, 1); } while (0)

/* One tile of 16 rows, bf16, D = 32 or 64, keys two 16-key chunks at a time (the K dimension of one tile dot
 * product over P . V is 32 keys). The output stays in tiles across chunks and is rescaled, through memory,
 * only when some row's running max grows (after the first blocks that is rare). Tiles: 0 S, 1 K or V pairs,
 * 2 Q^T pairs, 3..6 O, 7 P. */
static inline __attribute__((always_inline)) void tile_amx(const Problem *P, int64_t b, int64_t hs, int64_t j,
                                                           int64_t t, const int64_t D) {
    int32_t rowpos[LANES] __attribute__((aligned(64)));
    int64_t head[LANES], tok[LANES];
    const int32_t maxpos = tile_rows(P, hs, j, t, rowpos, head, tok);
    if (maxpos < 0) return;
    /* Q^T as (d, d+1) pairs per row: the rows' 32-bit pairs transposed, 16 x 16 at a time. */
    uint16_t QT2[64 * LANES] __attribute__((aligned(64)));
    for (int64_t h = 0; h < D; h += 32) {
        __m512 r[LANES];
        for (int l = 0; l < LANES; l++)
            r[l] = rowpos[l] < 0 ? _mm512_setzero_ps()
                                 : _mm512_loadu_ps((const float *)((const uint16_t *)P->q +
                                                                   qat(P, b, head[l], tok[l]) + h));
        transpose16(r);
        for (int p = 0; p < LANES; p++) _mm512_store_ps((float *)(QT2 + (h + 2 * p) * LANES), r[p]);
    }
    amx_configure();
    FOR_O_TILES(D, O_ZERO);
    const __m512i rp = _mm512_load_si512((const void *)rowpos);
    const __mmask16 live = _mm512_cmp_epi32_mask(rp, _mm512_setzero_si512(), _MM_CMPINT_NLT);
    const int32_t minpos = _mm512_mask_reduce_min_epi32(live, rp);
    /* Scores in base 2 (the scale times log2 e): the softmax then needs 2^x, not e^x. */
    const __m512 scale = _mm512_set1_ps(P->scale * 1.44269504088896341f);
    __m512 m = _mm512_set1_ps(-INFINITY), lsum = _mm512_setzero_ps();
    const int64_t kvh = (hs * (P->Hq / P->Hs)) / (P->Hq / P->Hkv);
    const size_t row_bytes = (size_t)D * 2;
    const char *kbase = (const char *)P->k + (size_t)((b * P->Hkv + kvh) * P->Tcap) * row_bytes;
    const char *vbase = (const char *)P->v + (size_t)((b * P->Hkv + kvh) * P->Tcap) * row_bytes;
    const uint8_t *valid = P->key_mask ? P->key_mask + b * P->Tk : NULL;
    static const uint16_t zeros[LANES * 64] __attribute__((aligned(64)));
    uint16_t kbuf[2][LANES * 64] __attribute__((aligned(64))), vbuf[2][LANES * 64] __attribute__((aligned(64)));
    float OL[LANES * 64] __attribute__((aligned(64)));
    const int64_t row = (b * P->Hs + hs) * P->nqb + j;
    const int32_t count = P->cnt[row];
    int32_t s = 0;
    int64_t c0 = -1, k1 = 0; /* the next chunk starts at c0 inside block s (before k1) */
    for (;;) {
        const char *kc[2], *vc[2];
        __mmask16 mk[2 * LANES];
        int n = 0;
        while (n < 2) { /* the next two chunks, across block boundaries */
            if (c0 < 0 || c0 >= k1) {
                if (s >= count) break;
                c0 = (int64_t)P->idx[row * P->S + s++] * P->bs;
                k1 = c0 + P->bs < P->Tk ? c0 + P->bs : P->Tk;
                if (k1 > (int64_t)maxpos + 1) k1 = (int64_t)maxpos + 1; /* keys after every row: never read */
                continue;
            }
            load_chunk(kbase, vbase, valid, c0, k1, rp, minpos, live, row_bytes, (char *)kbuf[n], (char *)vbuf[n],
                       &kc[n], &vc[n], mk + n * LANES);
            c0 += LANES;
            n++;
        }
        if (n == 0) break;
        if (n == 1) { /* an odd chunk out: a second of zero keys that no row sees */
            kc[1] = vc[1] = (const char *)zeros;
            memset(mk + LANES, 0, sizeof(__mmask16) * LANES);
        }
        float sc[2 * LANES * LANES] __attribute__((aligned(64)));
        for (int c = 0; c < 2; c++) {
            _tile_zero(0);
            for (int64_t h = 0; h < D; h += 32) {
                TILE_FENCE();
                _tile_loadd(1, kc[c] + h * 2, D * 2);
                _tile_loadd(2, QT2 + h * LANES, 64);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, sc + c * LANES * LANES, 64);
            TILE_FENCE();
        }
        __m512 p[2 * LANES], mx = m;
        for (int i = 0; i < 2 * LANES; i++) {
            p[i] = _mm512_mul_ps(_mm512_load_ps(sc + i * LANES), scale);
            mx = _mm512_mask_max_ps(mx, mk[i], mx, p[i]);
        }
        /* Rows still without a key keep a shift of 0 so that exp stays finite (their p are masked to 0). */
        __m512 shift = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(mx, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), mx);
        __m512 add = _mm512_setzero_ps();
        for (int i = 0; i < 2 * LANES; i++) {
            p[i] = _mm512_maskz_mov_ps(mk[i], exp2_bf16(_mm512_sub_ps(p[i], shift)));
            add = _mm512_add_ps(add, p[i]);
        }
        if (_mm512_cmp_ps_mask(mx, m, _CMP_GT_OQ)) { /* some row's max grew: rescale the output by alpha */
            /* exp16 (accurate, clamped at -inf) in base e: the running max of a row moves rarely */
            __m512 alpha = exp16(_mm512_mul_ps(_mm512_sub_ps(m, shift), _mm512_set1_ps(0.693147180559945f)));
            float al[LANES] __attribute__((aligned(64)));
            _mm512_store_ps(al, alpha);
            FOR_O_TILES(D, O_STORE);
            for (int r = 0; r < LANES; r++)
                for (int64_t z = 0; z < D; z += 16) {
                    float *o = OL + r * D + z;
                    _mm512_store_ps(o, _mm512_mul_ps(_mm512_load_ps(o), _mm512_set1_ps(al[r])));
                }
            FOR_O_TILES(D, O_LOAD);
            lsum = _mm512_mul_ps(lsum, alpha);
            m = mx;
        }
        lsum = _mm512_add_ps(lsum, add);
        /* P as rows x 32 keys in bf16 (A), the values as key pairs (B). */
        uint16_t pa[LANES * 2 * LANES] __attribute__((aligned(64)));
        int32_t VP[LANES * 64] __attribute__((aligned(64)));
        transpose16(p);
        transpose16(p + LANES);
        for (int r = 0; r < LANES; r++)
            _mm512_store_si512((void *)(pa + r * 2 * LANES), (__m512i)_mm512_cvtne2ps_pbh(p[LANES + r], p[r]));
        value_pairs(VP, (const uint16_t *)vc[0], D);
        value_pairs(VP + LANES / 2 * D, (const uint16_t *)vc[1], D);
        TILE_FENCE();
        _tile_loadd(7, pa, 64);
        FOR_O_TILES(D, O_DOT);
    }
    FOR_O_TILES(D, O_STORE);
    _tile_release();
    float lv[LANES] __attribute__((aligned(64))), mv[LANES] __attribute__((aligned(64)));
    _mm512_store_ps(lv, lsum);
    _mm512_store_ps(mv, m);
    for (int l = 0; l < LANES; l++) {
        if (rowpos[l] < 0) continue;
        int64_t at = (b * P->Hq + head[l]) * P->Tq + tok[l];
        float inv = lv[l] > 0.0f ? 1.0f / lv[l] : 0.0f;
        for (int64_t z = 0; z < D; z += 16)
            _mm512_storeu_ps(P->out + oat(P, b, head[l], tok[l]) + z, _mm512_mul_ps(_mm512_load_ps(OL + l * D + z), _mm512_set1_ps(inv)));
        P->lse[at] = lv[l] > 0.0f ? mv[l] * 0.693147180559945f + logf(lv[l]) : -INFINITY;
    }
}
#endif
#endif
