/* Block-sparse attention on x86-64 CPUs with AVX-512: the kernel of backend "native" (native.py).
 *
 * Layout: 16 query rows sit in the 16 lanes of a vector ("rows in lanes"), so a chunk of up to 16 keys is
 * scored as 16 vector accumulators S^T[key][row] = sum_d K[key][d] * Q^T[d][row]: each K element is a
 * broadcast operand read straight from the cache (no gathered copy of the selected blocks), Q^T is packed
 * once per tile, the online softmax runs across lanes (one row per lane, no horizontal reduction) and the
 * output is accumulated transposed, O^T[d][row], in a 16-lane buffer that stays in L1.
 *
 * bfloat16 inputs (never upcast copies of the cache; fp32 accumulation, fp32 softmax): on CPUs with AMX,
 * D = 32 or 64, both products are tile dot products (native_amx.h); otherwise vdpbf16ps products of bf16
 * pairs (AVX512-BF16): the cache's K pairs with Q packed as pairs, V rows interleaved into key pairs with
 * the probabilities rounded to bf16 pairs.
 *
 * Tiles with at most 4 rows (decode: one query per head) take the keys-in-lanes path (native_rows.h): a
 * rows-in-lanes tile would leave 15 of its 16 lanes empty.
 *
 * Work item: (batch, selection head, query block, 16 rows of its query heads x tokens: a GQA group sharing a
 * selection reads each K/V element once per tile), over OpenMP threads, the latest (largest) blocks first. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16
#define DMAX 256

static inline __m512 exp16(__m512 x) {
    /* e^x = 2^n e^r, n = round(x log2 e), |r| <= ln2 / 2; the Cephes expf polynomial (relative error ~1e-7).
     * Callers only pass x <= 0 and zero hidden entries with a mask, so the clamp only avoids denormals. */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}


typedef struct {
    const void *q, *k, *v;
    const int32_t *idx, *cnt;
    const uint8_t *key_mask; /* [B, Tk] or NULL */
    float *out, *lse;        /* [B, Hq, Tq, D], [B, Hq, Tq] */
    int64_t B, Hq, Hkv, Hs, Tq, Tk, Tcap, D, S, nqb, bs, qbs, offset; /* Tcap: K/V rows per head (>= Tk) */
    int64_t qs[3], os[3]; /* element strides of q and out over (batch, head, token); d is contiguous */
    int causal, bf16, amx; /* amx: bf16 through AMX tiles (granted by the OS, D = 32 or 64) */
    float scale;
} Problem;

/* Offsets of row (b, h, t) of q and of out, in elements. */
static inline int64_t qat(const Problem *P, int64_t b, int64_t h, int64_t t) {
    return b * P->qs[0] + h * P->qs[1] + t * P->qs[2];
}
static inline int64_t oat(const Problem *P, int64_t b, int64_t h, int64_t t) {
    return b * P->os[0] + h * P->os[1] + t * P->os[2];
}

/* Scores S^T[key][row] of one chunk of 16 keys, rows kc[i * D ...] (fp32): K elements as broadcasts. */
static inline __attribute__((always_inline)) void scores_f32(const float *QT, const float *kc, __m512 *acc,
                                                             const int64_t D) {
    for (int i = 0; i < LANES; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        __m512 qt = _mm512_load_ps(QT + d * LANES);
#pragma GCC unroll 16
        for (int i = 0; i < LANES; i++) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(kc[i * D + d]), qt, acc[i]);
    }
}

static inline __attribute__((always_inline)) void values_f32(float *OT, const float *vc, const __m512 *p,
                                                             __m512 alpha, const int64_t D) {
    for (int64_t d = 0; d < D; d++) {
        __m512 o = _mm512_mul_ps(_mm512_load_ps(OT + d * LANES), alpha);
#pragma GCC unroll 16
        for (int i = 0; i < LANES; i++) o = _mm512_fmadd_ps(_mm512_set1_ps(vc[i * D + d]), p[i], o);
        _mm512_store_ps(OT + d * LANES, o);
    }
}

#ifdef __AVX512BF16__
/* Element 2i <- a[i], 2i+1 <- b[i] of two 16-element halves: per-lane (x, y) bf16 pairs. */
#define PAIRS_OF_HALVES _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, \
                                          23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0)

static inline __m512i bf16_pairs(__m512 x, __m512 y) {
    /* cvtne2ps puts x in the low half, y in the high half (round to nearest even) */
    return _mm512_permutexvar_epi16(PAIRS_OF_HALVES, (__m512i)_mm512_cvtne2ps_pbh(y, x));
}

/* Pairs (a[i], b[i]) of two 32-element rows: i in 0..15 (PAIR_LO) and 16..31 (PAIR_HI). */
#define PAIR_LO _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, \
                                 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0)
#define PAIR_HI _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, \
                                 55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16)

/* Scores from bf16: QT2[d/2] holds (Q[row][d], Q[row][d+1]) per lane; K pairs are 32-bit broadcasts. */
static inline __attribute__((always_inline)) void scores_bf16(const uint16_t *QT2, const uint16_t *kc, __m512 *acc,
                                                              const int64_t D) {
    for (int i = 0; i < LANES; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 2) {
        __m512bh qt = (__m512bh)_mm512_load_si512((const void *)(QT2 + d * LANES));
#pragma GCC unroll 16
        for (int i = 0; i < LANES; i++) {
            int32_t pair;
            memcpy(&pair, kc + i * D + d, 4);
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(pair), qt);
        }
    }
}

/* O^T += V^T P^T from bf16: values of keys (2c, 2c+1) are interleaved once per chunk into 32-bit pairs per
 * dimension (VP), probabilities into bf16 pairs per lane (PP), so each step is one vdpbf16ps over two keys. */
/* Values of keys (2c, 2c+1) interleaved into 32-bit pairs per dimension: VP[c * D + d]. */
static inline __attribute__((always_inline)) void value_pairs(int32_t *VP, const uint16_t *vc, const int64_t D) {
    for (int c = 0; c < LANES / 2; c++) {
        const uint16_t *a = vc + 2 * c * D, *b = a + D;
        int64_t d = 0;
        for (; d + 32 <= D; d += 32) { /* two rows of 32 values -> 32 pairs */
            __m512i va = _mm512_loadu_si512((const void *)(a + d)), vb = _mm512_loadu_si512((const void *)(b + d));
            _mm512_store_si512((void *)(VP + c * D + d), _mm512_permutex2var_epi16(va, PAIR_LO, vb));
            _mm512_store_si512((void *)(VP + c * D + d + 16), _mm512_permutex2var_epi16(va, PAIR_HI, vb));
        }
        for (; d < D; d++) VP[c * D + d] = (int32_t)((uint32_t)a[d] | ((uint32_t)b[d] << 16));
    }
}

static inline __attribute__((always_inline)) void values_bf16(float *OT, const uint16_t *vc, const __m512 *p,
                                                              __m512 alpha, const int64_t D) {
    int32_t VP[LANES / 2 * DMAX] __attribute__((aligned(64)));
    value_pairs(VP, vc, D);
    __m512bh pp[LANES / 2];
    for (int c = 0; c < LANES / 2; c++) pp[c] = (__m512bh)bf16_pairs(p[2 * c], p[2 * c + 1]);
    for (int64_t d = 0; d < D; d++) {
        __m512 o = _mm512_mul_ps(_mm512_load_ps(OT + d * LANES), alpha);
#pragma GCC unroll 8
        for (int c = 0; c < LANES / 2; c++)
            o = _mm512_dpbf16_ps(o, (__m512bh)_mm512_set1_epi32(VP[c * D + d]), pp[c]);
        _mm512_store_ps(OT + d * LANES, o);
    }
}
#endif

/* Rows of tile t of query block j: positions (-1: no row; Tk without causality: every key), query heads and
 * tokens. Returns the last position, -1 when the tile is empty. */
static int32_t tile_rows(const Problem *P, int64_t hs, int64_t j, int64_t t, int32_t *rowpos, int64_t *head,
                         int64_t *tok) {
    const int64_t hps = P->Hq / P->Hs, rows = hps * P->qbs;
    int32_t maxpos = -1;
    for (int l = 0; l < LANES; l++) {
        int64_t r = t * LANES + l;
        head[l] = hs * hps + r / P->qbs;
        tok[l] = j * P->qbs + r % P->qbs;
        int ok = r < rows && tok[l] < P->Tq;
        rowpos[l] = !ok ? -1 : (P->causal ? (int32_t)(P->offset + tok[l]) : (int32_t)P->Tk);
        if (rowpos[l] > maxpos) maxpos = rowpos[l];
    }
    return maxpos;
}

/* The 16 keys from c0 (before k1) as rows *kc, *vc of stride D, and which rows see each key (mk). A ragged or
 * padded chunk is copied into kbuf / vbuf with zero rows for the keys outside the block or masked out: their
 * values are never multiplied in, so a NaN or inf there cannot reach the output as 0 * NaN, and nothing past
 * the block is read. */
static inline __attribute__((always_inline)) void load_chunk(const char *kbase, const char *vbase,
                                                             const uint8_t *valid, int64_t c0, int64_t k1,
                                                             __m512i rp, int32_t minpos, __mmask16 live,
                                                             size_t row_bytes, char *kbuf, char *vbuf,
                                                             const char **kc, const char **vc, __mmask16 *mk) {
    int whole = c0 + LANES <= k1;
    if (whole && !valid && c0 + LANES - 1 <= minpos) { /* every key before every row: all lanes see all keys */
        for (int i = 0; i < LANES; i++) mk[i] = live;
        *kc = kbase + (size_t)c0 * row_bytes;
        *vc = vbase + (size_t)c0 * row_bytes;
        return;
    }
    for (int i = 0; i < LANES; i++) {
        int ok = c0 + i < k1 && (!valid || valid[c0 + i]);
        whole &= ok;
        mk[i] = ok ? _mm512_cmp_epi32_mask(_mm512_set1_epi32((int32_t)(c0 + i)), rp, _MM_CMPINT_LE) : 0;
    }
    *kc = kbase + (size_t)c0 * row_bytes;
    *vc = vbase + (size_t)c0 * row_bytes;
    if (whole) return;
    for (int i = 0; i < LANES; i++) {
        if (c0 + i < k1 && (!valid || valid[c0 + i])) {
            memcpy(kbuf + i * row_bytes, *kc + i * row_bytes, row_bytes);
            memcpy(vbuf + i * row_bytes, *vc + i * row_bytes, row_bytes);
        } else {
            memset(kbuf + i * row_bytes, 0, row_bytes);
            memset(vbuf + i * row_bytes, 0, row_bytes);
        }
    }
    *kc = kbuf;
    *vc = vbuf;
}

#include "native_amx.h"

static inline __attribute__((always_inline)) void tile_impl(const Problem *P, int64_t b, int64_t hs, int64_t j,
                                                            int64_t t, const int64_t D) {
    const int64_t hps = P->Hq / P->Hs, group = P->Hq / P->Hkv;
    float QT[DMAX * LANES] __attribute__((aligned(64)));
    float OT[DMAX * LANES] __attribute__((aligned(64)));
    int32_t rowpos[LANES] __attribute__((aligned(64)));
    int64_t head[LANES], tok[LANES];
    const int32_t maxpos = tile_rows(P, hs, j, t, rowpos, head, tok);
    for (int l = 0; l < LANES; l++)
        for (int64_t d = 0; d < D; d++) {
            float x = 0.0f;
            if (rowpos[l] >= 0) {
                int64_t at = qat(P, b, head[l], tok[l]) + d;
                x = P->bf16 ? bf16_to_f32(((const uint16_t *)P->q)[at]) : ((const float *)P->q)[at];
            }
            QT[d * LANES + l] = x;
        }
    if (maxpos < 0) return;
    /* The scale multiplies fp32 scores, not q: q * scale rounded back to bf16 would lose bits. */
    const __m512 scale = _mm512_set1_ps(P->scale);
#ifdef __AVX512BF16__
    uint16_t QT2[DMAX * LANES] __attribute__((aligned(64)));
    if (P->bf16) /* (d, d+1) pairs per lane */
        for (int64_t d = 0; d < D; d += 2)
            _mm512_store_si512((void *)(QT2 + d * LANES),
                               bf16_pairs(_mm512_load_ps(QT + d * LANES), _mm512_load_ps(QT + (d + 1) * LANES)));
#endif
    memset(OT, 0, sizeof(float) * D * LANES);
    const __m512i rp = _mm512_load_si512((const void *)rowpos);
    const __mmask16 live = _mm512_cmp_epi32_mask(rp, _mm512_setzero_si512(), _MM_CMPINT_NLT);
    const int32_t minpos = _mm512_mask_reduce_min_epi32(live, rp);
    __m512 m = _mm512_set1_ps(-INFINITY), lsum = _mm512_setzero_ps();
    const int64_t kvh = (hs * hps) / group;
    const size_t esz = P->bf16 ? 2 : 4, row_bytes = (size_t)D * esz;
    const char *kbase = (const char *)P->k + (size_t)((b * P->Hkv + kvh) * P->Tcap) * row_bytes;
    const char *vbase = (const char *)P->v + (size_t)((b * P->Hkv + kvh) * P->Tcap) * row_bytes;
    const uint8_t *valid = P->key_mask ? P->key_mask + b * P->Tk : NULL;
    float kbuf[LANES * DMAX] __attribute__((aligned(64))), vbuf[LANES * DMAX] __attribute__((aligned(64)));
    const int64_t row = (b * P->Hs + hs) * P->nqb + j;
    const int32_t count = P->cnt[row];
    for (int32_t s = 0; s < count; s++) {
        int64_t k0 = (int64_t)P->idx[row * P->S + s] * P->bs;
        int64_t k1 = k0 + P->bs < P->Tk ? k0 + P->bs : P->Tk;
        if (k1 > (int64_t)maxpos + 1) k1 = (int64_t)maxpos + 1; /* keys after every row: never read */
        for (int64_t c0 = k0; c0 < k1; c0 += LANES) {
            __mmask16 mk[LANES];
            const char *kc, *vc;
            load_chunk(kbase, vbase, valid, c0, k1, rp, minpos, live, row_bytes, (char *)kbuf, (char *)vbuf, &kc, &vc,
                       mk);
            __m512 acc[LANES];
#ifdef __AVX512BF16__
            if (P->bf16) scores_bf16(QT2, (const uint16_t *)kc, acc, D); else
#endif
            scores_f32(QT, (const float *)kc, acc, D);
            __m512 mx = m;
            for (int i = 0; i < LANES; i++) {
                acc[i] = _mm512_mul_ps(acc[i], scale);
                mx = _mm512_mask_max_ps(mx, mk[i], mx, acc[i]);
            }
            /* Rows still without a key keep a shift of 0 so that exp stays finite (their p are masked to 0). */
            __m512 shift = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(mx, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), mx);
            __m512 alpha = exp16(_mm512_sub_ps(m, shift));
            __m512 p[LANES], add = _mm512_setzero_ps();
            for (int i = 0; i < LANES; i++) {
                p[i] = _mm512_maskz_mov_ps(mk[i], exp16(_mm512_sub_ps(acc[i], shift)));
                add = _mm512_add_ps(add, p[i]);
            }
            lsum = _mm512_fmadd_ps(lsum, alpha, add);
            m = mx;
#ifdef __AVX512BF16__
            if (P->bf16) values_bf16(OT, (const uint16_t *)vc, p, alpha, D); else
#endif
            values_f32(OT, (const float *)vc, p, alpha, D);
        }
    }
    float lv[LANES] __attribute__((aligned(64))), mv[LANES] __attribute__((aligned(64)));
    _mm512_store_ps(lv, lsum);
    _mm512_store_ps(mv, m);
    for (int l = 0; l < LANES; l++) {
        if (rowpos[l] < 0) continue;
        int64_t at = (b * P->Hq + head[l]) * P->Tq + tok[l];
        float inv = lv[l] > 0.0f ? 1.0f / lv[l] : 0.0f;
        float *o = P->out + oat(P, b, head[l], tok[l]);
        for (int64_t d = 0; d < D; d++) o[d] = OT[d * LANES + l] * inv;
        P->lse[at] = lv[l] > 0.0f ? mv[l] + logf(lv[l]) : -INFINITY;
    }
}

#include "native_rows.h"

static inline __attribute__((always_inline)) void tile_or_rows(const Problem *P, int64_t b, int64_t hs, int64_t j,
                                                               int64_t t, const int64_t D) {
    const int64_t hps = P->Hq / P->Hs, rows = hps * P->qbs;
    int64_t live = 0; /* rows of this tile that exist */
    for (int64_t r = t * LANES; r < (t + 1) * LANES && r < rows; r++) live += j * P->qbs + r % P->qbs < P->Tq;
    if (live > 4) {
#ifdef LONGATTN_AMX
        if (P->amx) {
            tile_amx(P, b, hs, j, t, D);
            return;
        }
#endif
        tile_impl(P, b, hs, j, t, D);
        return;
    }
    for (int64_t r = t * LANES; r < (t + 1) * LANES && r < rows; r++) {
        int64_t tok = j * P->qbs + r % P->qbs;
        if (tok < P->Tq) row_impl(P, b, hs * hps + r / P->qbs, tok, hs, j, D);
    }
}

/* The usual head sizes get their own copy with D a constant (the broadcast offsets become immediates). */
static void tile(const Problem *P, int64_t b, int64_t hs, int64_t j, int64_t t) {
    switch (P->D) {
    case 64: tile_or_rows(P, b, hs, j, t, 64); break;
    case 128: tile_or_rows(P, b, hs, j, t, 128); break;
    case 32: tile_or_rows(P, b, hs, j, t, 32); break;
    case 16: tile_or_rows(P, b, hs, j, t, 16); break;
    default: tile_or_rows(P, b, hs, j, t, P->D);
    }
}

/* k, v [B, Hkv, Tcap, D] of which the first Tk rows per head are read: a cache with room to grow is read in
 * place. q and out are read / written at their strides (a transposed projection is not copied; out may be
 * laid out [B, Tq, Hq, D], the layout the model reshapes for free). Returns 0, or a negative code for inputs this kernel does not take (the caller checks them first). */
int longattn_block_sparse(const void *q, const void *k, const void *v, const int32_t *idx, const int32_t *cnt,
                          const uint8_t *key_mask, float *out, float *lse, int64_t B, int64_t Hq, int64_t Hkv,
                          int64_t Hs, int64_t Tq, int64_t Tk, int64_t Tcap, int64_t D, int64_t S, int64_t nqb, int64_t bs,
                          int64_t qbs, int64_t offset, const int64_t *q_strides, const int64_t *out_strides,
                          int causal, float scale, int bf16, int use_amx, int threads) {
    if (D > DMAX || (bf16 && D % 2)) return -1;
#ifndef __AVX512BF16__
    if (bf16) return -2;
#endif
    int amx = 0;
#ifdef LONGATTN_AMX
    amx = bf16 && (D == 32 || D == 64) && use_amx && amx_request();
#endif
    Problem P = {q, k, v, idx, cnt, key_mask, out, lse, B, Hq, Hkv, Hs, Tq, Tk, Tcap, D, S, nqb, bs, qbs, offset,
                 {q_strides[0], q_strides[1], q_strides[2]}, {out_strides[0], out_strides[1], out_strides[2]},
                 causal, bf16, amx, scale};
    const int64_t tiles = (Hq / Hs * qbs + LANES - 1) / LANES;
    const int64_t per_block = B * Hs * tiles, items = nqb * per_block;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t it = 0; it < items; it++) {
        int64_t j = nqb - 1 - it / per_block, rest = it % per_block;
        tile(&P, rest / (Hs * tiles), (rest / tiles) % Hs, j, rest % tiles);
    }
    return 0;
}

int longattn_abi_version(void) { return 4; }
