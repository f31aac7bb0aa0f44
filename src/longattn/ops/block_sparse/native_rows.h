/* The keys-in-lanes path of the native kernel (included by native_kernel.c, which defines Problem, exp16). */
#ifndef LONGATTN_NATIVE_ROWS_H
#define LONGATTN_NATIVE_ROWS_H

/* 16 values at p (bf16 widened in registers by a shift, or fp32), lanes past D read as 0. */
static inline __m512 load16(const void *p, int bf16, __mmask16 lanes) {
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, p)), 16))
                : _mm512_maskz_loadu_ps(lanes, p);
}

static inline __mmask16 lanes_of(int64_t D, int64_t z) {
    return D - 16 * z >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - 16 * z)) - 1);
}

/* One query row over its blocks with keys in lanes: the path of tiles with few rows (decode, where a
 * rows-in-lanes tile would leave 15 of 16 lanes empty). Scores are dot products over D in vectors, the
 * softmax runs over 16 keys at a time; bf16 values are widened in registers. */
static inline __attribute__((always_inline)) void row_impl(const Problem *P, int64_t b, int64_t h, int64_t tok,
                                                           int64_t hs, int64_t j, const int64_t D) {
    const int64_t nz = (D + 15) / 16, kvh = h / (P->Hq / P->Hkv);
    const int32_t rowpos = P->causal ? (int32_t)(P->offset + tok) : (int32_t)P->Tk;
    const size_t esz = P->bf16 ? 2 : 4, row_bytes = (size_t)D * esz;
    const char *kbase = (const char *)P->k + (size_t)((b * P->Hkv + kvh) * P->Tcap) * row_bytes;
    const char *vbase = (const char *)P->v + (size_t)((b * P->Hkv + kvh) * P->Tcap) * row_bytes;
    const uint8_t *valid = P->key_mask ? P->key_mask + b * P->Tk : NULL;
    const int64_t at = (b * P->Hq + h) * P->Tq + tok;
    __m512 qv[DMAX / 16], o[DMAX / 16];
    for (int64_t z = 0; z < nz; z++) {
        qv[z] = _mm512_mul_ps(load16((const char *)P->q + (qat(P, b, h, tok) + 16 * z) * esz, P->bf16, lanes_of(D, z)),
                              _mm512_set1_ps(P->scale));
        o[z] = _mm512_setzero_ps();
    }
#ifdef __AVX512BF16__
    /* bf16 with D a multiple of 32: the query's own bf16 values (unscaled: q * scale would round again) */
    const int pairs = P->bf16 && D % 32 == 0;
    __m512bh qb[DMAX / 32];
    for (int64_t z = 0; pairs && z < D / 32; z++)
        qb[z] = (__m512bh)_mm512_loadu_si512((const void *)((const uint16_t *)P->q + qat(P, b, h, tok) + 32 * z));
#else
    const int pairs = 0;
#endif
    float m = -INFINITY, l = 0.0f;
    const int64_t row = (b * P->Hs + hs) * P->nqb + j;
    for (int32_t s = 0; s < P->cnt[row]; s++) {
        int64_t k0 = (int64_t)P->idx[row * P->S + s] * P->bs;
        int64_t k1 = k0 + P->bs < P->Tk ? k0 + P->bs : P->Tk;
        if (k1 > (int64_t)rowpos + 1) k1 = (int64_t)rowpos + 1;
        for (int64_t c0 = k0; c0 < k1; c0 += 16) {
            float sc[16] __attribute__((aligned(64)));
            __mmask16 seen = 0;
            for (int i = 0; i < 16; i++) {
                /* Keys outside the block, after the row or masked out are never read: no 0 * NaN. */
                sc[i] = -INFINITY;
                if (c0 + i >= k1 || (valid && !valid[c0 + i])) continue;
                seen |= (__mmask16)(1u << i);
                const char *kr = kbase + (size_t)(c0 + i) * row_bytes;
                __m512 acc = _mm512_setzero_ps();
#ifdef __AVX512BF16__
                if (pairs) /* bf16 products of 32 dimensions at a time, fp32 sums */
                    for (int64_t z = 0; z < D / 32; z++)
                        acc = _mm512_dpbf16_ps(acc, qb[z], (__m512bh)_mm512_loadu_si512((const void *)(kr + 64 * z)));
                else
#endif
                    for (int64_t z = 0; z < nz; z++)
                        acc = _mm512_fmadd_ps(qv[z], load16(kr + 16 * z * esz, P->bf16, lanes_of(D, z)), acc);
                sc[i] = _mm512_reduce_add_ps(acc) * (pairs ? P->scale : 1.0f);
            }
            if (!seen) continue;
            __m512 sv = _mm512_load_ps(sc);
            float mx = _mm512_mask_reduce_max_ps(seen, sv);
            if (mx < m) mx = m;
            float alpha = expf(m - mx); /* m = -inf on the first keys: alpha = 0 scales an empty sum */
            __m512 pv = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(sv, _mm512_set1_ps(mx))));
            l = l * alpha + _mm512_reduce_add_ps(pv);
            m = mx;
            float pr[16] __attribute__((aligned(64)));
            _mm512_store_ps(pr, pv);
            for (int64_t z = 0; z < nz; z++) o[z] = _mm512_mul_ps(o[z], _mm512_set1_ps(alpha));
#ifdef __AVX512BF16__
            if (pairs) { /* P . V as bf16 products over key pairs: two value rows interleaved per step */
                static const uint16_t zero_row[DMAX] __attribute__((aligned(64)));
                uint16_t pb[16] __attribute__((aligned(32)));
                _mm256_store_si256((__m256i *)pb, (__m256i)_mm512_cvtneps_pbh(pv));
                for (int i = 0; i < 16; i += 2) {
                    if (!(seen >> i & 3)) continue;
                    /* an unseen key of the pair reads zeros (its p is 0): no 0 * NaN */
                    const char *zr = (const char *)zero_row, *vr = vbase + (size_t)(c0 + i) * row_bytes;
                    const char *va = seen >> i & 1 ? vr : zr, *vb = seen >> (i + 1) & 1 ? vr + row_bytes : zr;
                    int32_t pair;
                    memcpy(&pair, pb + i, 4);
                    __m512bh pw = (__m512bh)_mm512_set1_epi32(pair);
                    for (int64_t h = 0; h < D / 32; h++) {
                        __m512i a = _mm512_loadu_si512((const void *)(va + 64 * h));
                        __m512i c = _mm512_loadu_si512((const void *)(vb + 64 * h));
                        __m512bh lo = (__m512bh)_mm512_permutex2var_epi16(a, PAIR_LO, c);
                        __m512bh hi = (__m512bh)_mm512_permutex2var_epi16(a, PAIR_HI, c);
                        o[2 * h] = _mm512_dpbf16_ps(o[2 * h], lo, pw);
                        o[2 * h + 1] = _mm512_dpbf16_ps(o[2 * h + 1], hi, pw);
                    }
                }
                continue;
            }
#endif
            for (int i = 0; i < 16; i++) {
                if (!(seen >> i & 1)) continue;
                const char *vr = vbase + (size_t)(c0 + i) * row_bytes;
                __m512 pi = _mm512_set1_ps(pr[i]);
                for (int64_t z = 0; z < nz; z++) {
                    o[z] = _mm512_fmadd_ps(pi, load16(vr + 16 * z * esz, P->bf16, lanes_of(D, z)), o[z]);
                }
            }
        }
    }
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int64_t z = 0; z < nz; z++) {
        _mm512_mask_storeu_ps(P->out + oat(P, b, h, tok) + 16 * z, lanes_of(D, z), _mm512_mul_ps(o[z], _mm512_set1_ps(inv)));
    }
    P->lse[at] = l > 0.0f ? m + logf(l) : -INFINITY;
}

#endif
