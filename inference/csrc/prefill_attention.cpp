// Prefill attention over the paged KV cache, for half precision on the CPU
// (inference/kernels.py, inference/llama.py).
//
// A prefill chunk's queries attend causally to every earlier key of their
// sequence and to the chunk's own, which the layer has already written into
// the cache: so the keys and values are read where they lie, through the
// sequence's block table, with or without earlier context.
//
// Why not SDPA: its bf16 CPU kernel splits the keys in blocks that depend on
// where a chunk starts and ends, so a prompt prefilled in two chunks (or
// resumed from cached blocks) got other last bits than prefilled whole, and a
// greedy near-tie flipped between batched and alone on the AMX Xeon. The
// engine had therefore widened each chunk's Q, K and V to fp32 and run SDPA's
// fp32 kernel: a quarter of a 512-token bf16 prefill step on that Xeon (2.1
// ms a layer for four 128-token prompts, of which 0.1 ms the widening).
//
// Here every query's result depends on its own values and its keys' alone:
// - a score is one fp32 sum over the head's dimensions, in order;
// - the softmax's sum runs over sixteen lanes fixed by the key's position
//   (p mod 16), then across them, and the keys a query does not see add 0;
// - the values are summed key by key, in position order.
// Rows are grouped (kRows a task, the KV head's query heads together,
// padded with zero queries to whole blocks) only so that a tile of keys,
// widened once, serves many queries; every query goes through the same code
// whatever its place in a block, and padding only adds exact zeros. So a row
// gets the same bits prefilled whole, in chunks of any size, or resumed.
//
// Sums in fp32 like the decode kernel's (paged_attention.cpp). Tasks are
// (row block, KV head) pairs, the longest (last) row blocks first, spread
// over the calling thread's torch count of OpenMP threads (not
// at::parallel_for: see paged_attention.cpp).
#include <ATen/Parallel.h>
#include <omp.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "storage.h"

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

using chatapp::BF16;
using chatapp::F16;
using chatapp::F32;
using chatapp::data;

constexpr int kRows = 16;   // query rows (positions) per task
constexpr int kTile = 16;   // keys per tile: one vector of fp32 lanes on AVX-512
constexpr int kQBlock = 8;  // queries scored together: independent sums sharing each key tile's loads
constexpr int kVBlock = 4;  // queries whose value sums are kept in registers across a tile
// Below this many multiply-adds a chunk runs on the calling thread.
constexpr int64_t kParallelMin = 1 << 18;

// Scores of kQBlock queries (query [kQBlock][dim], scaled) against a tile of
// keys (tile [dim][kTile], transposed): out[b * stride + j]. Each score is one
// sum over d in order, whichever path computes it.
inline void score_tile(const float* query, const float* tile, int64_t dim, float* out, int64_t stride) {
#if defined(__AVX512F__)
  static_assert(kTile == 16 && kQBlock == 8, "one zmm of keys, eight sums");
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
  for (int64_t d = 0; d < dim; ++d) {
    const __m512 k = _mm512_loadu_ps(tile + d * kTile);
    s0 = _mm512_fmadd_ps(_mm512_set1_ps(query[d]), k, s0);
    s1 = _mm512_fmadd_ps(_mm512_set1_ps(query[dim + d]), k, s1);
    s2 = _mm512_fmadd_ps(_mm512_set1_ps(query[2 * dim + d]), k, s2);
    s3 = _mm512_fmadd_ps(_mm512_set1_ps(query[3 * dim + d]), k, s3);
    s4 = _mm512_fmadd_ps(_mm512_set1_ps(query[4 * dim + d]), k, s4);
    s5 = _mm512_fmadd_ps(_mm512_set1_ps(query[5 * dim + d]), k, s5);
    s6 = _mm512_fmadd_ps(_mm512_set1_ps(query[6 * dim + d]), k, s6);
    s7 = _mm512_fmadd_ps(_mm512_set1_ps(query[7 * dim + d]), k, s7);
  }
  _mm512_storeu_ps(out, s0);
  _mm512_storeu_ps(out + stride, s1);
  _mm512_storeu_ps(out + 2 * stride, s2);
  _mm512_storeu_ps(out + 3 * stride, s3);
  _mm512_storeu_ps(out + 4 * stride, s4);
  _mm512_storeu_ps(out + 5 * stride, s5);
  _mm512_storeu_ps(out + 6 * stride, s6);
  _mm512_storeu_ps(out + 7 * stride, s7);
#else
  alignas(64) float s[kQBlock][kTile] = {};
  for (int64_t d = 0; d < dim; ++d) {
    const float* k = tile + d * kTile;
    for (int b = 0; b < kQBlock; ++b) {
      const float qd = query[b * dim + d];
#pragma omp simd
      for (int j = 0; j < kTile; ++j) s[b][j] += qd * k[j];
    }
  }
  for (int b = 0; b < kQBlock; ++b) std::copy(s[b], s[b] + kTile, out + b * stride);
#endif
}

// acc[b][d] += weights[b * stride + j] * values[j][d] for kVBlock queries and
// a tile of kTile values, key by key in order. With the head size known and
// AVX-512, the kVBlock x DIM sums stay in registers across the tile.
template <int DIM>
inline void sum_values(const float* weights, int64_t stride, const float* values, int64_t dim, float* acc) {
#if defined(__AVX512F__)
  if constexpr (DIM == 64) {
    static_assert(kVBlock == 4, "4 queries x 4 zmm of sums");
    __m512 a[kVBlock][4];
    for (int b = 0; b < kVBlock; ++b)
      for (int c = 0; c < 4; ++c) a[b][c] = _mm512_loadu_ps(acc + b * DIM + 16 * c);
    for (int j = 0; j < kTile; ++j) {
      const float* v = values + j * DIM;
      const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16), v2 = _mm512_loadu_ps(v + 32),
                   v3 = _mm512_loadu_ps(v + 48);
      for (int b = 0; b < kVBlock; ++b) {
        const __m512 w = _mm512_set1_ps(weights[b * stride + j]);
        a[b][0] = _mm512_fmadd_ps(w, v0, a[b][0]);
        a[b][1] = _mm512_fmadd_ps(w, v1, a[b][1]);
        a[b][2] = _mm512_fmadd_ps(w, v2, a[b][2]);
        a[b][3] = _mm512_fmadd_ps(w, v3, a[b][3]);
      }
    }
    for (int b = 0; b < kVBlock; ++b)
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + b * DIM + 16 * c, a[b][c]);
    return;
  }
  if constexpr (DIM == 32) {  // MiniLM's heads (padded_attention)
    __m512 a[kVBlock][2];
    for (int b = 0; b < kVBlock; ++b)
      for (int c = 0; c < 2; ++c) a[b][c] = _mm512_loadu_ps(acc + b * DIM + 16 * c);
    for (int j = 0; j < kTile; ++j) {
      const float* v = values + j * DIM;
      const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
      for (int b = 0; b < kVBlock; ++b) {
        const __m512 w = _mm512_set1_ps(weights[b * stride + j]);
        a[b][0] = _mm512_fmadd_ps(w, v0, a[b][0]);
        a[b][1] = _mm512_fmadd_ps(w, v1, a[b][1]);
      }
    }
    for (int b = 0; b < kVBlock; ++b)
      for (int c = 0; c < 2; ++c) _mm512_storeu_ps(acc + b * DIM + 16 * c, a[b][c]);
    return;
  }
#endif
  for (int j = 0; j < kTile; ++j) {
    const float* v = values + j * dim;
    for (int b = 0; b < kVBlock; ++b) {
      const float w = weights[b * stride + j];
      float* ab = acc + b * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) ab[d] += w * v[d];
    }
  }
}

// A query's softmax over the first `seen` scores of its row, in place and
// unnormalised, zeros from there to `width` (whole tiles); returns 1 / the
// sum. The maximum in sixteen lanes (exact in any order): one serial chain of
// scalar max was 40% of the kernel's time. The sum runs over sixteen lanes
// fixed by the key's position (p mod 16), then across them.
inline float softmax_row(float* row, int64_t seen, int64_t width) {
  alignas(64) float peaks[kTile];
  for (int j = 0; j < kTile; ++j) peaks[j] = row[0];
  int64_t pos = 0;
  for (; pos + kTile <= seen; pos += kTile) {
#pragma omp simd
    for (int j = 0; j < kTile; ++j) peaks[j] = row[pos + j] > peaks[j] ? row[pos + j] : peaks[j];
  }
  for (; pos < seen; ++pos) peaks[0] = row[pos] > peaks[0] ? row[pos] : peaks[0];
  float peak = peaks[0];
  for (int j = 1; j < kTile; ++j) peak = peaks[j] > peak ? peaks[j] : peak;
#pragma omp simd
  for (int64_t p = 0; p < seen; ++p) row[p] = std::exp(row[p] - peak);
  std::fill(row + seen, row + width, 0.f);
  alignas(64) float lanes[kTile] = {};
  for (int64_t base = 0; base < width; base += kTile) {
#pragma omp simd
    for (int j = 0; j < kTile; ++j) lanes[j] += row[base + j];
  }
  float sum = 0.f;
  for (int j = 0; j < kTile; ++j) sum += lanes[j];
  return 1.f / sum;
}

// DIM > 0: the head size fixed at compile time (loops unrolled); 0: dim at run time.
template <typename D, int DIM>
void prefill_attention_rows(const typename D::storage* q, int64_t q_row_stride, const typename D::storage* k_cache,
                            const typename D::storage* v_cache, const int64_t* blocks, int64_t q_len, int64_t ctx,
                            typename D::storage* out, int64_t heads, int64_t kv_heads, int64_t dim_arg,
                            int64_t num_blocks, int64_t block_size, float scale) {
  using T = typename D::storage;
  const int64_t dim = DIM > 0 ? DIM : dim_arg;
  const int64_t group = heads / kv_heads;
  const int64_t queries = kRows * group;
  const int64_t padded = (queries + kQBlock - 1) / kQBlock * kQBlock;  // a multiple of kQBlock and kVBlock
  const int64_t start = ctx - q_len;  // the chunk's first position
  const int64_t row_blocks = (q_len + kRows - 1) / kRows;
  const int64_t tasks = row_blocks * kv_heads;
  const int64_t work = q_len * ctx * heads * dim;
  const int threads = work >= kParallelMin ? at::get_num_threads() : 1;
  // Every key and value the chunk reads, widened to fp32 once and shared by
  // the tasks (each row block reads all the keys before it): keys in tiles
  // transposed, keys_t[kvh][t][d][j], and values values_w[kvh][pos][d], zero
  // past the context.
  const int64_t all_tiles = (ctx + kTile - 1) / kTile, all_width = all_tiles * kTile;
  std::vector<float> keys_t(kv_heads * all_width * dim), values_w(kv_heads * all_width * dim);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t job = 0; job < kv_heads * all_tiles; ++job) {
      const int64_t kvh = job / all_tiles, t = job % all_tiles;
      const T* k_head = k_cache + kvh * num_blocks * block_size * dim;
      const T* v_head = v_cache + kvh * num_blocks * block_size * dim;
      float* kt = keys_t.data() + (kvh * all_tiles + t) * dim * kTile;
      float* vw = values_w.data() + (kvh * all_width + t * kTile) * dim;
      for (int j = 0; j < kTile; ++j) {
        const int64_t pos = t * kTile + j;
        if (pos < ctx) {
          const int64_t slot = blocks[pos / block_size] * block_size + pos % block_size;
          const T* key = k_head + slot * dim;
          const T* value = v_head + slot * dim;
          for (int64_t d = 0; d < dim; ++d) kt[d * kTile + j] = D::load(key[d]);
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) vw[j * dim + d] = D::load(value[d]);
        } else {
          for (int64_t d = 0; d < dim; ++d) kt[d * kTile + j] = 0.f;
          std::fill(vw + j * dim, vw + (j + 1) * dim, 0.f);
        }
      }
    }  // the loop's barrier: every tile is ready before the tasks read them
    std::vector<float> query(padded * dim), acc(padded * dim), scores;
    std::vector<float> inv_sum(padded);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t rb = row_blocks - 1 - task / kv_heads, kvh = task % kv_heads;
      const int64_t r0 = rb * kRows, rows = std::min<int64_t>(kRows, q_len - r0);
      const int64_t keys = start + r0 + rows;  // what the block's last row sees
      const int64_t tiles = (keys + kTile - 1) / kTile, width = tiles * kTile;
      scores.resize(padded * width);
      // Query i is row i / group of the block, head i % group of the KV head's group.
      for (int64_t i = 0; i < padded; ++i) {
        float* dst = query.data() + i * dim;
        const int64_t r = i / group, g = i % group;
        if (r < rows) {
          const T* src = q + (r0 + r) * q_row_stride + (kvh * group + g) * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) dst[d] = D::load(src[d]) * scale;
        } else {
          std::fill(dst, dst + dim, 0.f);
        }
      }
      // Scores, a tile of keys at a time, against every query.
      const float* head_keys = keys_t.data() + kvh * all_tiles * dim * kTile;
      for (int64_t t = 0; t < tiles; ++t)
        for (int64_t i0 = 0; i0 < padded; i0 += kQBlock)
          score_tile(query.data() + i0 * dim, head_keys + t * dim * kTile, dim,
                     scores.data() + i0 * width + t * kTile, width);
      // Softmax per query over the keys it sees (positions up to its own),
      // unnormalised; 1 / the sum kept. The keys it does not see become 0.
      for (int64_t i = 0; i < padded; ++i) {
        float* row = scores.data() + i * width;
        const int64_t r = i / group;
        if (r >= rows) {
          std::fill(row, row + width, 0.f);
          inv_sum[i] = 0.f;
          continue;
        }
        inv_sum[i] = softmax_row(row, start + r0 + r + 1, width);
      }
      // Values, a tile at a time, summed key by key in order.
      std::fill(acc.begin(), acc.end(), 0.f);
      const float* head_values = values_w.data() + kvh * all_width * dim;
      for (int64_t t = 0; t < tiles; ++t)
        for (int64_t i0 = 0; i0 < padded; i0 += kVBlock)
          sum_values<DIM>(scores.data() + i0 * width + t * kTile, width, head_values + t * kTile * dim, dim,
                          acc.data() + i0 * dim);
      for (int64_t i = 0; i < rows * group; ++i) {
        const int64_t r = i / group, g = i % group;
        T* dst = out + ((r0 + r) * heads + kvh * group + g) * dim;
        const float* a = acc.data() + i * dim;
        const float inv = inv_sum[i];
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) dst[d] = D::store(a[d] * inv);
      }
    }
  }
}

template <typename D>
void dispatch_dim(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const int64_t* blocks,
                  int64_t ctx, at::Tensor& out, float scale) {
  const int64_t q_len = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(0), num_blocks = k_cache.size(1), block_size = k_cache.size(2);
  const auto run = [&](auto fixed) {
    prefill_attention_rows<D, decltype(fixed)::value>(data<D>(q), q.stride(0), data<D>(k_cache), data<D>(v_cache),
                                                      blocks, q_len, ctx, data<D>(out), heads, kv_heads, dim,
                                                      num_blocks, block_size, scale);
  };
  if (dim == 64)
    run(std::integral_constant<int, 64>{});
  else if (dim == 128)
    run(std::integral_constant<int, 128>{});
  else
    run(std::integral_constant<int, 0>{});
}

// q [Q, H, D] (rows may be strided: a slice of the fused QKV output; heads and
// values packed); caches [KV, num_blocks, block_size, D], this layer's, the
// chunk's own K and V already written; blocks [nb] int64, the sequence's
// table covering context_len; query i sits at position context_len - Q + i.
// Returns [Q, H, D].
at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& blocks, int64_t context_len, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "q [Q, H, D] and caches [KV, blocks, block_size, D] expected");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "q's heads and values must be packed within a row");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous caches expected");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(blocks.scalar_type() == at::kLong && blocks.dim() == 1 && blocks.is_contiguous(),
              "an int64 block table [nb] expected");
  const int64_t q_len = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(0), num_blocks = k_cache.size(1), block_size = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim && heads % kv_heads == 0, "head shapes do not match");
  TORCH_CHECK(q_len > 0 && context_len >= q_len && context_len <= blocks.size(0) * block_size,
              "context length outside the block table, or shorter than the chunk");
  const int64_t* table = blocks.data_ptr<int64_t>();
  for (int64_t j = 0; j < (context_len + block_size - 1) / block_size; ++j)
    TORCH_CHECK(table[j] >= 0 && table[j] < num_blocks, "block id out of range");
  at::Tensor out = at::empty({q_len, heads, dim}, q.options());
  const float s = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kFloat: dispatch_dim<F32>(q, k_cache, v_cache, table, context_len, out, s); break;
    case at::kBFloat16: dispatch_dim<BF16>(q, k_cache, v_cache, table, context_len, out, s); break;
    case at::kHalf: dispatch_dim<F16>(q, k_cache, v_cache, table, context_len, out, s); break;
    default: TORCH_CHECK(false, "paged_prefill_attention: fp32, bf16 or fp16 expected, got ", q.scalar_type());
  }
  return out;
}

// Bidirectional attention over right-padded sequences: an encoder's
// self-attention (retrieval's MiniLM, retrieval/minilm.py), where every
// position of sequence b attends to its first lengths[b] keys.
//
// Why not SDPA: at MiniLM's shapes (32-wide heads, about 100 tokens, 12 heads
// of 32 texts) its CPU flash kernel spends about a third of the six layers'
// time on about 5% of their FLOPs, in bf16 as in fp32 (docs/BENCHMARKS.md,
// "MiniLM's attention in the library"). Here a text is one task: its keys,
// values and queries of every head widened to fp32 once, then per head every
// query's scores a tile of keys at a time (score_tile), the softmax over the
// text's keys, and the values summed in order (sum_values), as the prefill
// kernel does.
template <typename D, int DIM>
void padded_attention_heads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* lengths,
                            at::Tensor& out, float scale) {
  using T = typename D::storage;
  const int64_t batch = q.size(0), heads = q.size(1), len = q.size(2);
  const int64_t dim = DIM > 0 ? DIM : q.size(3);
  const T *qd = data<D>(q), *kd = data<D>(k), *vd = data<D>(v);
  T* od = data<D>(out);
  // [B, H, L, D] views with any strides but the last: HF's heads are a
  // transposed view of the projections' [B, L, H * D].
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)}, ks[3] = {k.stride(0), k.stride(1), k.stride(2)},
                vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const int64_t tiles = (len + kTile - 1) / kTile, width = tiles * kTile;
  const int64_t padded = (len + kQBlock - 1) / kQBlock * kQBlock;
  const int64_t work = batch * heads * len * len * dim;
  const int threads = work >= kParallelMin ? at::get_num_threads() : 1;
#pragma omp parallel num_threads(threads)
  {
    // A text's keys, values and queries of every head, widened once: each
    // position's heads lie side by side in the projections' rows, so a task
    // reads its text's rows whole (one head's 64 bytes every 768, a task per
    // (text, head), spent a fifth of the time waiting on memory).
    std::vector<float> keys_t(heads * width * dim), values_w(heads * width * dim), query(heads * padded * dim),
        acc(padded * dim), scores(padded * width), inv_sum(padded);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      // Only the text's own positions are computed: its padding is never
      // read (its keys are masked, its rows left out of the pooled mean),
      // and a batch's shorter texts are padded by up to half their length.
      const int64_t seen = lengths[b];
      const int64_t rows = (seen + kQBlock - 1) / kQBlock * kQBlock, used = (seen + kTile - 1) / kTile;
      for (int64_t pos = 0; pos < used * kTile; ++pos) {
        for (int64_t h = 0; h < heads; ++h) {
          float* kt = keys_t.data() + (h * tiles + pos / kTile) * dim * kTile + pos % kTile;
          float* vw = values_w.data() + (h * width + pos) * dim;
          if (pos < seen) {
            const T* key = kd + b * ks[0] + h * ks[1] + pos * ks[2];
            const T* value = vd + b * vs[0] + h * vs[1] + pos * vs[2];
            for (int64_t d = 0; d < dim; ++d) kt[d * kTile] = D::load(key[d]);
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) vw[d] = D::load(value[d]);
          } else {
            for (int64_t d = 0; d < dim; ++d) kt[d * kTile] = 0.f;
            std::fill(vw, vw + dim, 0.f);
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t h = 0; h < heads; ++h) {
          float* dst = query.data() + (h * padded + i) * dim;
          const T* src = qd + b * qs[0] + h * qs[1] + i * qs[2];
          if (i < seen) {
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) dst[d] = D::load(src[d]) * scale;
          } else {
            std::fill(dst, dst + dim, 0.f);
          }
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        const float* head_keys = keys_t.data() + h * tiles * dim * kTile;
        const float* head_values = values_w.data() + h * width * dim;
        const float* head_query = query.data() + h * padded * dim;
        for (int64_t t = 0; t < used; ++t)
          for (int64_t i0 = 0; i0 < rows; i0 += kQBlock)
            score_tile(head_query + i0 * dim, head_keys + t * dim * kTile, dim, scores.data() + i0 * width + t * kTile,
                       width);
        // Softmax per query over the text's keys, unnormalised; 1 / the sum kept.
        for (int64_t i = 0; i < rows; ++i) {
          inv_sum[i] = softmax_row(scores.data() + i * width, seen, used * kTile);
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t = 0; t < used; ++t)
          for (int64_t i0 = 0; i0 < rows; i0 += kVBlock)
            sum_values<DIM>(scores.data() + i0 * width + t * kTile, width, head_values + t * kTile * dim, dim,
                            acc.data() + i0 * dim);
        for (int64_t i = 0; i < len; ++i) {
          T* dst = od + ((b * len + i) * heads + h) * dim;
          const float* a = acc.data() + i * dim;
          const float inv = i < seen ? inv_sum[i] : 0.f;  // a padding position's output: zeros
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) dst[d] = D::store(a[d] * inv);
        }
      }
    }
  }
}

// q, k, v [B, H, L, D] (any strides but the last); lengths [B] int64, each in
// 1..L: text b's keys are its first lengths[b] positions, which each of those
// positions attends to. Returns [B, L, H, D], contiguous, zero past a text's
// length.
at::Tensor padded_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                            double scale) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k, v [B, H, L, D] expected");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "each head's values must be packed");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v must share a dtype");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.is_contiguous() &&
                  lengths.size(0) == q.size(0),
              "int64 lengths [B] expected");
  const int64_t* lens = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b)
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= q.size(2), "a length outside 1..L");
  at::Tensor out = at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options());
  const float s = static_cast<float>(scale);
  const auto run = [&](auto tag, auto fixed) {
    padded_attention_heads<decltype(tag), decltype(fixed)::value>(q, k, v, lens, out, s);
  };
  const bool d32 = q.size(3) == 32;
  switch (q.scalar_type()) {
    case at::kFloat:
      d32 ? run(F32{}, std::integral_constant<int, 32>{}) : run(F32{}, std::integral_constant<int, 0>{});
      break;
    case at::kBFloat16:
      d32 ? run(BF16{}, std::integral_constant<int, 32>{}) : run(BF16{}, std::integral_constant<int, 0>{});
      break;
    default: TORCH_CHECK(false, "padded_attention: fp32 or bf16 expected, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

// The schema is defined from Python (inference.kernels), as paged_decode_attention's.
TORCH_LIBRARY_IMPL(chatapp, CPU, m) {
  m.impl("paged_prefill_attention", &paged_prefill_attention);
  m.impl("padded_attention", &padded_attention);
}
