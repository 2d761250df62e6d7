// Decode attention that reads the paged KV cache in place (inference/kernels.py).
//
// The torch path gathers every sequence's K and V blocks into new tensors with
// index_select and then runs SDPA over the copies: each step copies the whole
// KV in use, then reads it again. This kernel reads each block where it lies,
// through the block table: one pass over K, one over V, for all of a KV head's
// query heads (grouped-query attention) at once.
//
// Built at engine start for the machine at hand (-march=native) and cached;
// inference.kernels checks it against the torch path before the engine uses it.
//
// One task per (sequence, KV head), run on the OpenMP runtime torch loaded, with
// the calling thread's torch count (at::get_num_threads), so the engine's
// thread count holds for it as for the
// matmuls. Sums in fp32 whatever the cache's dtype; the softmax subtracts the
// row's max, as SDPA and HF's eager attention do.
#include <ATen/Parallel.h>
#include <omp.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
inline float to_float(T value) { return static_cast<float>(value); }

// Each of `rows` rows of `scores` (ctx wide) exponentiated after subtracting
// the row's max, unnormalised; inv_sum[r] is 1 / the row's sum.
inline void softmax_rows(float* scores, int64_t rows, int64_t ctx, float* inv_sum) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * ctx;
    float peak = row[0];  // not -inf: the library is built with -ffast-math (finite math only)
    for (int64_t pos = 1; pos < ctx; ++pos) peak = std::max(peak, row[pos]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t pos = 0; pos < ctx; ++pos) {
      row[pos] = std::exp(row[pos] - peak);
      sum += row[pos];
    }
    inv_sum[r] = 1.f / sum;
  }
}

// A sequence's block j in `head` (its first element), with block j + 1
// prefetched, a cache line at a time, while block j is read.
template <typename T>
inline const T* block_prefetching_next(const T* head, const int64_t* blocks, int64_t j, int64_t used_blocks,
                                       int64_t block_elems) {
  if (j + 1 < used_blocks) {
    const T* next = head + blocks[j + 1] * block_elems;
    for (int64_t e = 0; e < block_elems; e += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(next + e, 0, 1);
  }
  return head + blocks[j] * block_elems;
}

// q [B, H, D]; caches [KV, num_blocks, block_size, D] (this layer's);
// block_table [B, max_blocks] int64; context_lens [B] int64; out [B, H, D].
template <typename T>
void decode_attention(const T* q, const T* k_cache, const T* v_cache, const int64_t* table,
                      const int64_t* context_lens, T* out, int64_t batch, int64_t heads, int64_t kv_heads,
                      int64_t dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t group = heads / kv_heads;
  // Not at::parallel_for: that header inlines torch's lazy per-thread init,
  // whose flag this library would hold a second copy of, so its first call on
  // each thread reset the thread's count to whatever count any thread set last
  // (an engine measured on one thread after another engine's one-thread step).
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> query(group * dim), acc(group * dim), scores;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < batch * kv_heads; ++task) {
      const int64_t b = task / kv_heads, kvh = task % kv_heads;
      const int64_t ctx = context_lens[b];
      const int64_t* blocks = table + b * max_blocks;
      scores.assign(group * ctx, 0.f);
      for (int64_t g = 0; g < group; ++g) {
        const T* src = q + (b * heads + kvh * group + g) * dim;
        for (int64_t d = 0; d < dim; ++d) query[g * dim + d] = to_float(src[d]) * scale;
      }
      const T* k_head = k_cache + kvh * num_blocks * block_size * dim;
      const T* v_head = v_cache + kvh * num_blocks * block_size * dim;
      // Scores: every key once, against the group's query heads.
      for (int64_t pos = 0; pos < ctx; ++pos) {
        const T* key = k_head + (blocks[pos / block_size] * block_size + pos % block_size) * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = query.data() + g * dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < dim; ++d) dot += qg[d] * to_float(key[d]);
          scores[g * ctx + pos] = dot;
        }
      }
      // Softmax per query head, unnormalised; divided once at the end.
      std::vector<float> inv_sum(group);
      softmax_rows(scores.data(), group, ctx, inv_sum.data());
      // Values: every value once, weighted for each query head.
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t pos = 0; pos < ctx; ++pos) {
        const T* value = v_head + (blocks[pos / block_size] * block_size + pos % block_size) * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float weight = scores[g * ctx + pos];
          float* ag = acc.data() + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ag[d] += weight * to_float(value[d]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* dst = out + (b * heads + kvh * group + g) * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<T>(acc[g * dim + d] * inv_sum[g]);
      }
    }
  }
}

// Calls fn(position, row) for each of a sequence's ctx rows of `head` (its K
// or its V), in order, each row widened to fp32; the blocks are walked in
// table order, the next one prefetched while the current one is read.
template <typename T, int DIM, typename F>
inline void for_each_row(const T* head, const int64_t* blocks, int64_t ctx, int64_t block_size, F&& fn) {
  const int64_t block_elems = block_size * DIM, used_blocks = (ctx + block_size - 1) / block_size;
  for (int64_t j = 0; j < used_blocks; ++j) {
    const T* base = block_prefetching_next(head, blocks, j, used_blocks, block_elems);
    const int64_t first = j * block_size, count = std::min(block_size, ctx - first);
    for (int64_t i = 0; i < count; ++i) {
      alignas(64) float row[DIM];
#pragma omp simd
      for (int d = 0; d < DIM; ++d) row[d] = to_float(base[i * DIM + d]);
      fn(first + i, row);
    }
  }
}

// The same computation with the head size and the group size known at compile
// time, so that the compiler can keep the group's queries (3 x 64 floats for
// SmolLM2) and its accumulators in vector registers and unroll the loops;
// each key and value row is widened once and used for every query head of
// the group. Each sequence's
// next KV block is prefetched while the current one is read: a block is 4 KiB
// in fp32 (one page), and the hardware prefetchers stop at a page's end, so a
// sequence whose blocks are scattered stalled at every block.
template <typename T, int DIM, int GROUP>
void decode_attention_fixed(const T* q, const T* k_cache, const T* v_cache, const int64_t* table,
                            const int64_t* context_lens, T* out, int64_t batch, int64_t heads, int64_t kv_heads,
                            int64_t num_blocks, int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t block_elems = block_size * DIM;
  const int threads = at::get_num_threads();  // see decode_attention
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < batch * kv_heads; ++task) {
      const int64_t b = task / kv_heads, kvh = task % kv_heads;
      const int64_t ctx = context_lens[b];
      const int64_t* blocks = table + b * max_blocks;
      scores.resize(GROUP * ctx);
      alignas(64) float query[GROUP][DIM];
      for (int g = 0; g < GROUP; ++g) {
        const T* src = q + (b * heads + kvh * GROUP + g) * DIM;
#pragma omp simd
        for (int d = 0; d < DIM; ++d) query[g][d] = to_float(src[d]) * scale;
      }
      const T* k_head = k_cache + kvh * num_blocks * block_elems;
      const T* v_head = v_cache + kvh * num_blocks * block_elems;
      // Scores: every key once against the group's queries.
      for_each_row<T, DIM>(k_head, blocks, ctx, block_size, [&](int64_t pos, const float* key) {
        for (int g = 0; g < GROUP; ++g) {
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int d = 0; d < DIM; ++d) dot += query[g][d] * key[d];
          scores[g * ctx + pos] = dot;
        }
      });
      float inv_sum[GROUP];
      softmax_rows(scores.data(), GROUP, ctx, inv_sum);
      // Values: every value once, weighted for each query head.
      alignas(64) float acc[GROUP][DIM] = {};
      for_each_row<T, DIM>(v_head, blocks, ctx, block_size, [&](int64_t pos, const float* value) {
        for (int g = 0; g < GROUP; ++g) {
          const float weight = scores[g * ctx + pos];
#pragma omp simd
          for (int d = 0; d < DIM; ++d) acc[g][d] += weight * value[d];
        }
      });
      for (int g = 0; g < GROUP; ++g) {
        T* dst = out + (b * heads + kvh * GROUP + g) * DIM;
        for (int d = 0; d < DIM; ++d) dst[d] = static_cast<T>(acc[g][d] * inv_sum[g]);
      }
    }
  }
}

// The shapes with a fixed kernel: head sizes 64 and 128, groups of 1-4, 6 or 8
// query heads per KV head (SmolLM2-135M: 64 and 3). False: use the general one.
template <typename T>
bool dispatch_fixed(const T* q, const T* k, const T* v, const int64_t* table, const int64_t* lens, T* out,
                    int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, int64_t num_blocks,
                    int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t group = heads / kv_heads;
#define CHATAPP_FIXED(D, G)                                                                                   \
  if (dim == D && group == G) {                                                                               \
    decode_attention_fixed<T, D, G>(q, k, v, table, lens, out, batch, heads, kv_heads, num_blocks, block_size, \
                                    max_blocks, scale);                                                       \
    return true;                                                                                              \
  }
  CHATAPP_FIXED(64, 1) CHATAPP_FIXED(64, 2) CHATAPP_FIXED(64, 3) CHATAPP_FIXED(64, 4) CHATAPP_FIXED(64, 6)
  CHATAPP_FIXED(64, 8) CHATAPP_FIXED(128, 1) CHATAPP_FIXED(128, 2) CHATAPP_FIXED(128, 3) CHATAPP_FIXED(128, 4)
  CHATAPP_FIXED(128, 6) CHATAPP_FIXED(128, 8)
#undef CHATAPP_FIXED
  return false;
}

// Either kernel, by shape.
template <typename T>
void run_attention(const T* q, const T* k, const T* v, const int64_t* table, const int64_t* lens, T* out,
                   int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, int64_t num_blocks,
                   int64_t block_size, int64_t max_blocks, float scale) {
  if (!dispatch_fixed<T>(q, k, v, table, lens, out, batch, heads, kv_heads, dim, num_blocks, block_size,
                         max_blocks, scale))
    decode_attention<T>(q, k, v, table, lens, out, batch, heads, kv_heads, dim, num_blocks, block_size,
                        max_blocks, scale);
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_table, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "q [B, H, D] and caches [KV, blocks, block_size, D] expected");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous tensors expected");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "int64 block table and context lengths expected");
  TORCH_CHECK(block_table.dim() == 2 && block_table.is_contiguous() && context_lens.is_contiguous(),
              "block table [B, max_blocks] expected");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(0), num_blocks = k_cache.size(1), block_size = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim && heads % kv_heads == 0, "head shapes do not match");
  TORCH_CHECK(block_table.size(0) == batch && context_lens.size(0) == batch, "one table row per sequence");
  const int64_t max_blocks = block_table.size(1);
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens[b] > 0 && lens[b] <= max_blocks * block_size, "context length outside the block table");
    for (int64_t j = 0; j < (lens[b] + block_size - 1) / block_size; ++j)
      TORCH_CHECK(table[b * max_blocks + j] >= 0 && table[b * max_blocks + j] < num_blocks, "block id out of range");
  }
  at::Tensor out = at::empty_like(q);
  const float s = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kFloat:
      run_attention<float>(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), table, lens,
                              out.data_ptr<float>(), batch, heads, kv_heads, dim, num_blocks, block_size, max_blocks, s);
      break;
    case at::kBFloat16:
      run_attention<c10::BFloat16>(q.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
                                      v_cache.data_ptr<c10::BFloat16>(), table, lens, out.data_ptr<c10::BFloat16>(),
                                      batch, heads, kv_heads, dim, num_blocks, block_size, max_blocks, s);
      break;
    case at::kHalf:
      run_attention<c10::Half>(q.data_ptr<c10::Half>(), k_cache.data_ptr<c10::Half>(), v_cache.data_ptr<c10::Half>(),
                                  table, lens, out.data_ptr<c10::Half>(), batch, heads, kv_heads, dim, num_blocks,
                                  block_size, max_blocks, s);
      break;
    default:
      TORCH_CHECK(false, "paged_decode_attention: fp32, bf16 or fp16 expected, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

// The schema is defined from Python (inference.kernels), so the scripted layer
// stack compiles against it whether or not this library could be built.
TORCH_LIBRARY_IMPL(chatapp, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
