/* Block scoring + max-pool + top-k on x86-64 CPUs with AVX-512: the kernel of block top-k backend "native"
 * (native.py); naive.py is its definition.
 *
 * Why: the PyTorch path writes every query's score against every key block ([Hq, Tq, Nblk] floats, 2.4 GB
 * per layer at 32k tokens, in chunks) and reads it back to pool, mask and sort; here a query block's scores
 * live in registers, are max-pooled over its rows as they are made, and only [Hq, Nblk] pooled floats per
 * query block reach memory, for blocks before the query block's window only (the causal half is skipped).
 *
 * Layout: key blocks sit in the lanes ("blocks in lanes"): the summaries come transposed, M^T[d][block], so
 * 32 blocks are two vector loads per d, each query element is a broadcast operand, and 8 query rows keep 16
 * accumulators; the max over a query block's rows is a vertical vmaxps, never a horizontal reduction. Rows
 * are padded to a multiple of 8 with copies of a real row, which leaves every max unchanged; all query heads
 * of a KV head go through one pass over the summaries (in decode, one row each, they share a chunk). The "minmax"
 * bound sum_d max(q_d min_d, q_d max_d) is the dot product of [max(q, 0), min(q, 0)] with [max; min]: the
 * same loop over 2D.
 *
 * Top-k: a min-heap of the k best (score, block) pairs, ties to the lower block id; best first out.
 * Work item: (batch, KV head, query block), over OpenMP threads, the latest (largest) query blocks first. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 8

int longattn_topk_abi_version(void) { return 3; }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* a worse than b: lower score, or equal score and higher block id. */
static inline int worse(float sa, int32_t ia, float sb, int32_t ib) { return sa < sb || (sa == sb && ia > ib); }

static void sift_down(float *s, int32_t *id, int n, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && worse(s[l], id[l], s[m], id[m])) m = l;
        if (r < n && worse(s[r], id[r], s[m], id[m])) m = r;
        if (m == i) return;
        float ts = s[i]; s[i] = s[m]; s[m] = ts;
        int32_t ti = id[i]; id[i] = id[m]; id[m] = ti;
        i = m;
    }
}

/* The k best valid entries of score[0..n) (valid: ok[n] and finite) into out[0..k), best first, -1 padded. */
static void best_k(const float *score, const uint8_t *ok, int64_t n, int k, float *hs, int32_t *hid, int32_t *out) {
    int size = 0;
    for (int64_t j = 0; j < n; j++) {
        float v = score[j];
        if (!ok[j] || !isfinite(v)) continue;
        if (size < k) {
            /* sift up */
            int i = size++;
            hs[i] = v; hid[i] = (int32_t)j;
            while (i > 0) {
                int p = (i - 1) / 2;
                if (!worse(hs[i], hid[i], hs[p], hid[p])) break;
                float ts = hs[i]; hs[i] = hs[p]; hs[p] = ts;
                int32_t ti = hid[i]; hid[i] = hid[p]; hid[p] = ti;
                i = p;
            }
        } else if (worse(hs[0], hid[0], v, (int32_t)j)) {
            hs[0] = v; hid[0] = (int32_t)j;
            sift_down(hs, hid, size, 0);
        }
    }
    for (int i = size; i < k; i++) out[i] = -1;
    /* Pop the worst to the back: out ends best first. */
    for (int n2 = size; n2 > 0; n2--) {
        out[n2 - 1] = hid[0];
        hs[0] = hs[n2 - 1]; hid[0] = hid[n2 - 1];
        sift_down(hs, hid, n2 - 1, 0);
    }
}

/* One 32-block column: pooled[g][j0 + i] = max over the rows r of head g (head[r] = g) of
 * sum_d q[r][d] * col[d * stride + i], i < 32; bad[g][.]: some score was NaN. q holds nrows rows of dk floats,
 * nrows a multiple of ROWS. All of a KV head's query heads go through one pass: the column (dk x 32 floats)
 * stays in L1 while every row reads it. */
static void pooled_column(const float *q, const int32_t *head, int64_t nrows, const float *col, int64_t stride,
                          int64_t dk, int64_t npad, int64_t j0, float *pooled, uint8_t *bad) {
    for (int64_t r0 = 0; r0 < nrows; r0 += ROWS) {
        __m512 a[ROWS][2];
        for (int r = 0; r < ROWS; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
        const float *qr = q + r0 * dk;
        for (int64_t d = 0; d < dk; d++) {
            __m512 m0 = _mm512_loadu_ps(col + d * stride);
            __m512 m1 = _mm512_loadu_ps(col + d * stride + 16);
            for (int r = 0; r < ROWS; r++) {
                __m512 x = _mm512_set1_ps(qr[r * dk + d]);
                a[r][0] = _mm512_fmadd_ps(x, m0, a[r][0]);
                a[r][1] = _mm512_fmadd_ps(x, m1, a[r][1]);
            }
        }
        for (int r = 0; r < ROWS; r++) {
            float *p = pooled + head[r0 + r] * npad + j0;
            uint8_t *nb = bad + head[r0 + r] * npad + j0;
            __mmask16 n0 = _mm512_cmp_ps_mask(a[r][0], a[r][0], _CMP_UNORD_Q);
            __mmask16 n1 = _mm512_cmp_ps_mask(a[r][1], a[r][1], _CMP_UNORD_Q);
            _mm512_storeu_ps(p, _mm512_max_ps(_mm512_loadu_ps(p), a[r][0]));
            _mm512_storeu_ps(p + 16, _mm512_max_ps(_mm512_loadu_ps(p + 16), a[r][1]));
            if (n0 | n1)
                for (int l = 0; l < 16; l++) {
                    nb[l] |= (n0 >> l) & 1;
                    nb[16 + l] |= (n1 >> l) & 1;
                }
        }
    }
}

/* q [B, Hq, Tq, D] (float32, or bfloat16 when q_bf16) at element strides qs over (batch, head, token), d
 * contiguous: the model's transposed projection is read without a copy. Summaries either transposed, mt [B, Hkv, Dk, Npad]
 * float32 (Dk = D, or 2D for minmax: max rows then min rows; Npad a multiple of 32, zero beyond Nblk), or as
 * the index keeps them (mt NULL), s [B, Hkv, Nblk, R, D] float32 (R = 1 mean, R >= 2 min, max), transposed
 * here one 32-block column at a time: worth it when few query blocks read each column (decode), where a
 * transposed copy per call would cost more than the scoring. limit [nqb], sink_lo/hi [B] int64; has_key
 * [B, Nblk] uint8 or NULL -> out [B, Hq, nqb, top_k] int32. Returns 0, or a code > 0. */
int longattn_block_topk(const void *q, const float *mt, const float *s, const int64_t *limit,
                        const int64_t *sink_lo, const int64_t *sink_hi, const uint8_t *has_key, int32_t *out,
                        int64_t B, int64_t Hq, int64_t Hkv, int64_t Tq, int64_t D, int64_t nblk, int64_t npad,
                        int64_t R, int64_t qbs, int64_t nqb, int64_t top_k, const int64_t *qs, int minmax,
                        int q_bf16, int threads) {
    if (Hq % Hkv || npad % 32 || npad < nblk || top_k < 1 || qbs < 1 || (!mt && !s) || R < 1 + minmax) return 1;
    const int64_t G = Hq / Hkv, dk = minmax ? 2 * D : D;
    const int64_t ntask = B * Hkv * nqb;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        /* Per thread: one query block's rows of every head of the group (padded), their heads, the pooled
         * scores and NaN flags per head, validity, the heap. */
        const int64_t max_rows = ((G * qbs + ROWS - 1) / ROWS) * ROWS + ROWS;
        float *qloc = malloc(sizeof(float) * max_rows * dk);
        int32_t *head = malloc(sizeof(int32_t) * max_rows);
        float *pooled = malloc(sizeof(float) * G * npad);
        uint8_t *bad = malloc(G * npad), *ok = malloc(npad);
        float *hs = malloc(sizeof(float) * top_k);
        int32_t *hid = malloc(sizeof(int32_t) * top_k);
        float *tile = malloc(sizeof(float) * dk * 32);
        if (!qloc || !head || !pooled || !bad || !ok || !hs || !hid || !tile) {
#pragma omp atomic write
            failed = 2;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < ntask; t++) {
            if (failed) continue;
            const int64_t j = nqb - 1 - t % nqb, h = (t / nqb) % Hkv, b = t / (nqb * Hkv);
            const int64_t first = j * qbs, rows = (Tq - first < qbs) ? Tq - first : qbs;
            int64_t nk = limit[j] < nblk ? limit[j] : nblk;
            if (nk <= 0) {
                for (int64_t g = 0; g < G; g++)
                    for (int64_t i = 0; i < top_k; i++) out[((b * Hq + h * G + g) * nqb + j) * top_k + i] = -1;
                continue;
            }
            int64_t nrows = 0;
            for (int64_t g = 0; g < G; g++) {
                const int64_t hq = h * G + g;
                /* A head with 8 rows or more fills whole chunks (its last row repeated): a chunk then
                 * holds one head's rows, whose max a repeated row leaves unchanged. */
                const int64_t take = rows >= ROWS ? ((rows + ROWS - 1) / ROWS) * ROWS : rows;
                for (int64_t r = 0; r < take; r++, nrows++) {
                    const int64_t at = b * qs[0] + hq * qs[1] + (first + (r < rows ? r : rows - 1)) * qs[2];
                    float *dst = qloc + nrows * dk;
                    head[nrows] = (int32_t)g;
                    for (int64_t d = 0; d < D; d++) {
                        float x = q_bf16 ? bf16_to_f32(((const uint16_t *)q)[at + d]) : ((const float *)q)[at + d];
                        if (minmax) {
                            /* Written so that a NaN query element stays NaN in both halves, as in naive. */
                            dst[d] = x < 0.0f ? 0.0f : x;
                            dst[D + d] = x > 0.0f ? 0.0f : x;
                        } else {
                            dst[d] = x;
                        }
                    }
                }
            }
            /* Fewer than 8 rows per head (decode): heads share chunks; the last chunk repeats its last row. */
            for (; nrows % ROWS; nrows++) {
                memcpy(qloc + nrows * dk, qloc + (nrows - 1) * dk, sizeof(float) * dk);
                head[nrows] = head[nrows - 1];
            }
            const int64_t cols = ((nk + 31) / 32) * 32;
            for (int64_t g = 0; g < G; g++) {
                for (int64_t n = 0; n < cols; n++) pooled[g * npad + n] = -INFINITY;
                memset(bad + g * npad, 0, cols);
            }
            for (int64_t j0 = 0; j0 < nk; j0 += 32) {
                if (mt) {
                    pooled_column(qloc, head, nrows, mt + (b * Hkv + h) * dk * npad + j0, npad, dk, npad, j0,
                                  pooled, bad);
                    continue;
                }
                const float *sb = s + (b * Hkv + h) * nblk * R * D;
                for (int64_t i = 0; i < 32; i++) {
                    const int64_t n = j0 + i;
                    for (int64_t d = 0; d < D; d++) {
                        if (n >= nblk) {
                            tile[d * 32 + i] = 0.0f;
                            if (minmax) tile[(D + d) * 32 + i] = 0.0f;
                        } else if (minmax) {
                            tile[d * 32 + i] = sb[(n * R + 1) * D + d];
                            tile[(D + d) * 32 + i] = sb[n * R * D + d];
                        } else {
                            tile[d * 32 + i] = sb[n * R * D + d];
                        }
                    }
                }
                pooled_column(qloc, head, nrows, tile, 32, dk, npad, j0, pooled, bad);
            }
            for (int64_t n = 0; n < nk; n++)
                ok[n] = (n < sink_lo[b] || n >= sink_hi[b]) && (!has_key || has_key[b * nblk + n]);
            for (int64_t g = 0; g < G; g++) {
                float *p = pooled + g * npad;
                for (int64_t n = 0; n < nk; n++)
                    if (bad[g * npad + n]) p[n] = NAN;
                best_k(p, ok, nk, (int)top_k, hs, hid, out + ((b * Hq + h * G + g) * nqb + j) * top_k);
            }
        }
        free(qloc); free(head); free(pooled); free(bad); free(ok); free(hs); free(hid); free(tile);
    }
    return failed;
}
