/* A C model of CPU decode's memory behaviour: how fast loops of different shapes read a paged
 * KV pool from DRAM on this machine, side by side in rounds (the machine's bandwidth moves within
 * minutes). It backs the CPU decode analysis in the README's known gaps.
 *
 * The pool is 2 GiB of 128 KiB blocks (one block of the Llama-3-8B shape in fp32: K and V of 8
 * heads x 16 rows x 512 bytes), visited in a random order by 2 threads, each head's K rows then its
 * V rows, as decode does. Loops:
 *   read-seq-1t / read-seq  plain AVX-512 read of the pool in address order, 1 and 2 threads
 *   read-blocks[-2m]        plain read of the random blocks, 4 KiB pages [2 MiB huge pages]
 *   read-blocks-4s          the same read with 4 random blocks per thread at a time, 256 bytes
 *                           of each in turn (4 interleaved streams; huge pages)
 *   decode-2s               decode's loop over 2 random blocks per thread at a time: each head's
 *                           QK key by key from both blocks (two interleaved streams), then each
 *                           block's softmax and P-V (two softmax states, merged once at the end)
 *   decode-nt / decode-pf2  decode without the V-row touches / with its prefetches 2 blocks ahead
 *   decode-hk               per block, QK and softmax of all 8 heads first (K rows in address
 *                           order), then P-V of all 8 heads (V rows in address order); the next
 *                           block's K rows prefetched during QK, its V rows during P-V, no touches
 * NOTE: the decode loops' lane sums (_mm512_reduce_add_ps) and serial softmax make them bound by
 * their arithmetic at about 50 GB/s when the memory is fast; pgen's CPU decode computes about
 * twice as fast (fp32, blocks in L2), so there only the slow-phase rounds model its memory side.
 *   stream                  one pass per 64-byte line, 4 FMAs into 4 running sums (decode's
 *                           FMAs per byte at a GQA group of 4), next block prefetched line by line
 *   decode                  decode's structure: per key, 4 query rows x 8 vectors of fresh
 *                           partials and their lane sums; softmax; P-V into a 4 x 8 register
 *                           tile; decode's prefetches (next block's K and V rows during QK, next
 *                           head's rows during P-V) and V-row touches
 *   pipelined               decode's arithmetic with a head's QK interleaved key by key with the
 *                           previous head's P-V, next block's K and V prefetched during QK
 * Each loop but read-blocks runs on huge pages. Data is ones; results are not checked (timing only).
 * It also measures one core's fp32 FMA rate (512-bit FMAs on 12 independent chains).
 *
 * Build and run (x86-64 with AVX-512F):
 *   gcc -O2 -mavx512f -mfma -fopenmp bench/decode_model.c -o /tmp/decode_model
 *   /tmp/decode_model [bench/results/decode_model.json]
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define BLK (128 * 1024)
#define NB 16384 /* 2 GiB */
#define ROUNDS 3
#define HINT _MM_HINT_T1

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int perm[NB];

/* Blocks p[0..3] read together, 256 bytes of each in turn. */
static __m512 read_bytes4(const char *const *p, size_t n, __m512 a) {
  __m512 a1 = _mm512_setzero_ps(), a2 = a1, a3 = a1;
  for (size_t i = 0; i < n; i += 256)
    for (int s = 0; s < 4; s++) {
      a = _mm512_add_ps(a, _mm512_load_ps((const float *)(p[s] + i)));
      a1 = _mm512_add_ps(a1, _mm512_load_ps((const float *)(p[s] + i + 64)));
      a2 = _mm512_add_ps(a2, _mm512_load_ps((const float *)(p[s] + i + 128)));
      a3 = _mm512_add_ps(a3, _mm512_load_ps((const float *)(p[s] + i + 192)));
    }
  return _mm512_add_ps(_mm512_add_ps(a, a1), _mm512_add_ps(a2, a3));
}

static __m512 read_bytes(const char *p, size_t n, __m512 a) {
  __m512 a1 = _mm512_setzero_ps(), a2 = a1, a3 = a1;
  for (size_t i = 0; i < n; i += 256) {
    a = _mm512_add_ps(a, _mm512_load_ps((const float *)(p + i)));
    a1 = _mm512_add_ps(a1, _mm512_load_ps((const float *)(p + i + 64)));
    a2 = _mm512_add_ps(a2, _mm512_load_ps((const float *)(p + i + 128)));
    a3 = _mm512_add_ps(a3, _mm512_load_ps((const float *)(p + i + 192)));
  }
  return _mm512_add_ps(_mm512_add_ps(a, a1), _mm512_add_ps(a2, a3));
}

/* 16 rows of 512 bytes: one pass per line, 4 FMAs into 4 running sums, and a prefetch of the same
 * line of `pf`. */
static void stream_chunk(const char *p, __m512 *acc, const __m512 *q, const char *pf) {
  for (int l = 0; l < 128; l++) {
    __m512 k = _mm512_load_ps((const float *)(p + l * 64));
    _mm_prefetch(pf + l * 64, HINT);
    acc[0] = _mm512_fmadd_ps(k, q[0], acc[0]);
    acc[1] = _mm512_fmadd_ps(k, q[1], acc[1]);
    acc[2] = _mm512_fmadd_ps(k, q[2], acc[2]);
    acc[3] = _mm512_fmadd_ps(k, q[3], acc[3]);
  }
}

/* Scores of key row t (8 vectors) for 4 query rows: fresh partials, lane sums. */
static inline void score_row(const char *k, const __m512 *q, float *s, int t) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int l = 0; l < 8; l++) {
    __m512 x = _mm512_load_ps((const float *)(k + t * 512 + l * 64));
    a0 = _mm512_fmadd_ps(x, q[l], a0);
    a1 = _mm512_fmadd_ps(x, q[8 + l], a1);
    a2 = _mm512_fmadd_ps(x, q[16 + l], a2);
    a3 = _mm512_fmadd_ps(x, q[24 + l], a3);
  }
  s[t] = _mm512_reduce_add_ps(a0);
  s[16 + t] = _mm512_reduce_add_ps(a1);
  s[32 + t] = _mm512_reduce_add_ps(a2);
  s[48 + t] = _mm512_reduce_add_ps(a3);
}

static inline void prefetch_row(const char *p, int t) {
  for (int l = 0; l < 8; l++) _mm_prefetch(p + t * 512 + l * 64, HINT);
}

static inline __m512 touch_row(const char *p, int t, __m512 a) {
  for (int l = 0; l < 8; l++)
    a = _mm512_max_ps(a, _mm512_castps128_ps512(_mm_load_ss((const float *)(p + t * 512 + l * 64))));
  return a;
}

/* Online softmax of 4 rows x 16 scores: serial max and sum per row, as decode does. */
static void softmax(float *s, float *m, float *sum) {
  for (int r = 0; r < 4; r++) {
    float mx = m[r], acc = 0;
    for (int t = 0; t < 16; t++) mx = s[r * 16 + t] > mx ? s[r * 16 + t] : mx;
    for (int t = 0; t < 16; t++) {
      s[r * 16 + t] = (s[r * 16 + t] - mx) * 1e-3f;
      acc += s[r * 16 + t];
    }
    sum[r] = sum[r] * 0.5f + acc;
    m[r] = mx;
  }
}

/* P-V of 16 V rows into out[4][128]: two passes of a 4 x 4-vector register tile, each prefetching
 * its half of the lines of rows of `pf1` and `pf2` (the next head's K and V). */
static void pv(const char *v, const float *s, float *out, const char *pf1, const char *pf2) {
  for (int cg = 0; cg < 2; cg++) {
    __m512 t[16];
    for (int i = 0; i < 16; i++) t[i] = _mm512_load_ps(out + (i / 4) * 128 + cg * 64 + (i % 4) * 16);
    for (int k = 0; k < 16; k++) {
      for (int l = 0; l < 4; l++) {
        _mm_prefetch(pf1 + k * 512 + (cg * 4 + l) * 64, HINT);
        _mm_prefetch(pf2 + k * 512 + (cg * 4 + l) * 64, HINT);
      }
      __m512 b0 = _mm512_set1_ps(s[k]), b1 = _mm512_set1_ps(s[16 + k]);
      __m512 b2 = _mm512_set1_ps(s[32 + k]), b3 = _mm512_set1_ps(s[48 + k]);
      for (int c = 0; c < 4; c++) {
        __m512 x = _mm512_load_ps((const float *)(v + k * 512 + (cg * 4 + c) * 64));
        t[c] = _mm512_fmadd_ps(x, b0, t[c]);
        t[4 + c] = _mm512_fmadd_ps(x, b1, t[4 + c]);
        t[8 + c] = _mm512_fmadd_ps(x, b2, t[8 + c]);
        t[12 + c] = _mm512_fmadd_ps(x, b3, t[12 + c]);
      }
    }
    for (int i = 0; i < 16; i++) _mm512_store_ps(out + (i / 4) * 128 + cg * 64 + (i % 4) * 16, t[i]);
  }
}

/* QK of head rows `k` (scores into s_new) interleaved key by key with P-V of the previous head's V
 * rows `v` (NULL: none) weighted by s_old; the next block's K and V rows prefetched. */
static void qk_pv(const char *k, const __m512 *q, float *s_new, const char *pfk, const char *pfv, const char *v,
                  const float *s_old, float *out) {
  __m512 lo[16], hi[16];
  for (int i = 0; i < 16; i++) {
    lo[i] = _mm512_load_ps(out + (i / 4) * 128 + (i % 4) * 16);
    hi[i] = _mm512_load_ps(out + (i / 4) * 128 + 64 + (i % 4) * 16);
  }
  for (int t = 0; t < 16; t++) {
    prefetch_row(pfk, t);
    prefetch_row(pfv, t);
    score_row(k, q, s_new, t);
    if (v) {
      __m512 b0 = _mm512_set1_ps(s_old[t]), b1 = _mm512_set1_ps(s_old[16 + t]);
      __m512 b2 = _mm512_set1_ps(s_old[32 + t]), b3 = _mm512_set1_ps(s_old[48 + t]);
      for (int c = 0; c < 4; c++) {
        __m512 x = _mm512_load_ps((const float *)(v + t * 512 + c * 64));
        __m512 y = _mm512_load_ps((const float *)(v + t * 512 + (4 + c) * 64));
        lo[c] = _mm512_fmadd_ps(x, b0, lo[c]);
        lo[4 + c] = _mm512_fmadd_ps(x, b1, lo[4 + c]);
        lo[8 + c] = _mm512_fmadd_ps(x, b2, lo[8 + c]);
        lo[12 + c] = _mm512_fmadd_ps(x, b3, lo[12 + c]);
        hi[c] = _mm512_fmadd_ps(y, b0, hi[c]);
        hi[4 + c] = _mm512_fmadd_ps(y, b1, hi[4 + c]);
        hi[8 + c] = _mm512_fmadd_ps(y, b2, hi[8 + c]);
        hi[12 + c] = _mm512_fmadd_ps(y, b3, hi[12 + c]);
      }
    }
  }
  for (int i = 0; i < 16; i++) {
    _mm512_store_ps(out + (i / 4) * 128 + (i % 4) * 16, lo[i]);
    _mm512_store_ps(out + (i / 4) * 128 + 64 + (i % 4) * 16, hi[i]);
  }
}

/* 512-bit FMAs per second on one core: 12 independent chains. */
static double fma_rate(void) {
  __m512 a[12], b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-3f);
  for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps((float)i);
  long n = 100000000;
  double t0 = now();
  for (long i = 0; i < n; i++) {
#pragma GCC unroll 12
    for (int j = 0; j < 12; j++) a[j] = _mm512_fmadd_ps(a[j], b, c);
  }
  double dt = now() - t0;
  __m512 s = a[0];
  for (int i = 1; i < 12; i++) s = _mm512_add_ps(s, a[i]);
  if (_mm512_reduce_add_ps(s) == 12345.f) printf(" ");
  return 12.0 * n / dt;
}

enum { READ_SEQ_1T, READ_SEQ, READ_BLOCKS, READ_BLOCKS_2M, STREAM, DECODE, PIPELINED, READ_BLOCKS_4S, DECODE_2S, DECODE_NT, DECODE_PF2, DECODE_HK, NLOOPS };
static const char *names[NLOOPS] = {"read-seq-1t", "read-seq", "read-blocks", "read-blocks-2m",
                                    "stream", "decode", "pipelined", "read-blocks-4s", "decode-2s", "decode-nt", "decode-pf2", "decode-hk"};

/* One timed pass of loop `mode` over pool x (small: 4 KiB pages, huge: 2 MiB); GB/s. */
static double run(int mode, const char *small, const char *huge) {
  const char *x = mode == READ_BLOCKS ? small : huge;
  int threads = mode == READ_SEQ_1T ? 1 : 2;
  double t0 = now();
  float total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    __m512 q[32], acc[4], touch = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
    for (int i = 0; i < 32; i++) q[i] = _mm512_set1_ps(1e-3f * i);
    for (int i = 0; i < 4; i++) acc[i] = _mm512_setzero_ps();
    float s[2][64] __attribute__((aligned(64)));
    float out[512] __attribute__((aligned(64)));
    float m[4] = {0}, l[4] = {0};
    memset(out, 0, sizeof out);
    const char *prev_v = NULL;
    int cur = 0;
    if (mode == READ_BLOCKS_4S) {
#pragma omp for schedule(static)
      for (int b = 0; b < NB / 4; b++) {
        const char *p4[4];
        for (int s = 0; s < 4; s++) p4[s] = x + (size_t)perm[4 * b + s] * BLK;
        sum = read_bytes4(p4, BLK, sum);
      }
    } else if (mode == DECODE_2S) {
      float m2[4] = {0}, l2[4] = {0};
      float out2[512] __attribute__((aligned(64)));
      memset(out2, 0, sizeof out2);
#pragma omp for schedule(static)
      for (int b = 0; b < NB / 2; b++) {
        const char *p = x + (size_t)perm[2 * b] * BLK, *p2 = x + (size_t)perm[2 * b + 1] * BLK;
        const char *pn = x + (size_t)perm[(2 * b + 2) % NB] * BLK, *pn2 = x + (size_t)perm[(2 * b + 3) % NB] * BLK;
        for (int h = 0; h < 8; h++) {
          const char *k = p + h * 8192, *v = p + 65536 + h * 8192;
          const char *k2 = p2 + h * 8192, *v2 = p2 + 65536 + h * 8192;
          const char *nk = h < 7 ? k + 8192 : pn, *nv = h < 7 ? v + 8192 : pn + 65536;
          const char *nk2 = h < 7 ? k2 + 8192 : pn2, *nv2 = h < 7 ? v2 + 8192 : pn2 + 65536;
          for (int t = 0; t < 16; t++) {
            prefetch_row(pn + h * 8192, t);
            prefetch_row(pn + 65536 + h * 8192, t);
            prefetch_row(pn2 + h * 8192, t);
            prefetch_row(pn2 + 65536 + h * 8192, t);
            touch = touch_row(v, t, touch);
            touch = touch_row(v2, t, touch);
            score_row(k, q, s[0], t);
            score_row(k2, q, s[1], t);
          }
          softmax(s[0], m, l);
          softmax(s[1], m2, l2);
          pv(v, s[0], out, nk, nv);
          pv(v2, s[1], out2, nk2, nv2);
        }
      }
      out[5] += out2[7] + l2[1];
    } else if (mode == DECODE_HK) {
      float sh[8][64] __attribute__((aligned(64)));
      float mh[8][4] = {{0}}, lh[8][4] = {{0}};
#pragma omp for schedule(static)
      for (int b = 0; b < NB; b++) {
        const char *p = x + (size_t)perm[b] * BLK, *pn = x + (size_t)perm[(b + 1) % NB] * BLK;
        for (int h = 0; h < 8; h++) {
          for (int t = 0; t < 16; t++) {
            prefetch_row(pn + h * 8192, t);
            score_row(p + h * 8192, q, sh[h], t);
          }
          softmax(sh[h], mh[h], lh[h]);
        }
        for (int h = 0; h < 8; h++)
          pv(p + 65536 + h * 8192, sh[h], out, pn + 65536 + h * 8192, pn + 65536 + h * 8192 + 4096);
      }
      out[5] += lh[3][1];
    } else
#pragma omp for schedule(static)
    for (int b = 0; b < NB; b++) {
      const char *p = x + (size_t)(mode <= READ_SEQ ? b : perm[b]) * BLK;
      const char *pn = x + (size_t)perm[(b + 1) % NB] * BLK;
      if (mode <= READ_BLOCKS_2M) {
        sum = read_bytes(p, BLK, sum);
        continue;
      }
      for (int h = 0; h < 8; h++) {
        const char *k = p + h * 8192, *v = p + 65536 + h * 8192;
        const char *nk = h < 7 ? k + 8192 : pn, *nv = h < 7 ? v + 8192 : pn + 65536;
        if (mode == STREAM) {
          stream_chunk(k, acc, q, pn + h * 8192);
          stream_chunk(v, acc, q, pn + 65536 + h * 8192);
        } else if (mode == DECODE || mode == DECODE_NT || mode == DECODE_PF2) {
          const char *pf = mode == DECODE_PF2 ? x + (size_t)perm[(b + 2) % NB] * BLK : pn;
          for (int t = 0; t < 16; t++) {
            prefetch_row(pf + h * 8192, t);
            prefetch_row(pf + 65536 + h * 8192, t);
            if (mode != DECODE_NT) touch = touch_row(v, t, touch);
            score_row(k, q, s[0], t);
          }
          softmax(s[0], m, l);
          pv(v, s[0], out, nk, nv);
        } else {
          qk_pv(k, q, s[cur], pn + h * 8192, pn + 65536 + h * 8192, prev_v, s[1 - cur], out);
          softmax(s[cur], m, l);
          prev_v = v;
          cur = 1 - cur;
        }
      }
    }
    total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(sum, touch), _mm512_add_ps(acc[0], acc[3]))) + out[5] +
             l[1];
  }
  double dt = now() - t0;
  if (total == 12345.f) printf(" ");  // keep the sums alive
  return (double)NB * BLK / dt / 1e9;
}

int main(int argc, char **argv) {
  size_t n = (size_t)NB * BLK;
  char *small = aligned_alloc(2 << 20, n), *huge = aligned_alloc(2 << 20, n);
  if (!small || !huge) return 1;
  madvise(small, n, MADV_NOHUGEPAGE);
  madvise(huge, n, MADV_HUGEPAGE);
  for (size_t i = 0; i < n / 4; i++) ((float *)small)[i] = ((float *)huge)[i] = 1.0f;
  for (int i = 0; i < NB; i++) perm[i] = i;
  srand(1);
  for (int i = NB - 1; i > 0; i--) {
    int j = rand() % (i + 1), t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
  double fma = fma_rate();
  printf("fp32 FMA peak, one core: %.2f G 512-bit FMAs/s = %.0f G lanes/s\n", fma / 1e9, 16 * fma / 1e9);
  double gbps[ROUNDS][NLOOPS];
  printf("GB/s of the pool read per loop, rounds side by side (2 threads unless -1t)\n%6s", "round");
  for (int m = 0; m < NLOOPS; m++) printf("%16s", names[m]);
  printf("\n");
  for (int r = 0; r < ROUNDS; r++) {
    printf("%6d", r);
    for (int m = 0; m < NLOOPS; m++) {
      double best = 0;
      for (int rep = 0; rep < 2; rep++) {
        double g = run(m, small, huge);
        best = g > best ? g : best;
      }
      gbps[r][m] = best;
      printf("%16.1f", best);
      fflush(stdout);
    }
    printf("\n");
  }
  const char *path = argc > 1 ? argv[1] : "bench/results/decode_model.json";
  FILE *f = fopen(path, "w");
  if (!f) return 1;
  fprintf(f, "{\"fma_per_s_one_core\": %.4g, \"block_bytes\": %d, \"blocks\": %d, \"rounds\": [", fma, BLK, NB);
  for (int r = 0; r < ROUNDS; r++) {
    fprintf(f, "%s{", r ? ", " : "");
    for (int m = 0; m < NLOOPS; m++) fprintf(f, "%s\"%s\": %.2f", m ? ", " : "", names[m], gbps[r][m]);
    fprintf(f, "}");
  }
  fprintf(f, "]}\n");
  fclose(f);
  printf("wrote %s\n", path);
  return 0;
}
