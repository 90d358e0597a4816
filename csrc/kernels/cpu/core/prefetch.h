// Software prefetch of the CPU core: the rows of the work item ahead, queued and issued a few at a
// time during the current one, and the ring of work items' token lists that drives it.
#pragma once

#include <cstdint>

#include "rsir/params.h"
#include "kernels/cpu/core/config.h"
#include "kernels/cpu/core/rows.h"
#include "kernels/cpu/core/scratch.h"
#include "kernels/cpu/core/types.h"

namespace rsir::cpu::RSIR_CPU_BUILD {

// Software prefetch of the rows x[b, tok[i], h0 .. h0 + nh - 1, :] (the gathers are random
// accesses over the whole sequence: without this, each item waits on cache misses one row
// at a time). To L2, not L1 (prefetcht2, not prefetcht0): a prefetcht0 holds one of the
// core's few L1 fill buffers per line and stalls when they are all taken (11% of the AMX bf16
// forward's samples sat on it); the demand loads then hit L2 (docs/performance.md).
static inline void prefetch(const void* p) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  // inline asm: GCC deletes loops that contain nothing but __builtin_prefetch
  __asm__ volatile("prefetcht2 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);  // elsewhere unmeasured: the builtin's default (L1)
  __asm__ volatile("" : : "r"(p) : "memory");
#endif
}

// Deferred prefetches: the addresses of the next item's rows, issued a few at a time while
// the current item computes (pump, from the softmax's row loop). Issued in one burst, the
// hundreds of prefetches of an item fill the miss buffers and stall the core until the first
// lines arrive; spread out, they overlap with the arithmetic.
struct PrefetchQueue {
  const void** addr = nullptr;
  int64_t n = 0, pos = 0, cap = 0;
  void push(const void* p) {
    if (n < cap) addr[n++] = p;
    else prefetch(p);
  }
  void pump(int64_t k) {
    const int64_t e = imin(n, pos + k);
    for (; pos < e; ++pos) prefetch(addr[pos]);
  }
  void drain() {
    pump(n);
    n = pos = 0;
  }
};

// Prefetch lines per row of D elements of T (at most).
template <class T>
static inline int64_t prefetch_lines(int64_t D) { return D * (int64_t)sizeof(T) / 64 + 2; }

// Where the group's nh heads lie back to back (head stride D, unit dim stride: the usual
// contiguous layout), a token's rows are prefetched as one span of nh * D elements: no line is
// prefetched twice (rows shorter than a line: bf16 / fp16 at D = 16 share lines between heads).
template <class T>
static inline void prefetch_rows(const T* x, const int64_t* s, int64_t b, int64_t h0, int64_t nh,
                                 const int64_t* tok, int64_t m, int64_t D, PrefetchQueue& pq) {
  const int64_t line = 64 / (int64_t)sizeof(T);
  const bool joined = s[3] == 1 && s[2] == D;
  // a non-unit dim stride: the first element only
  const int64_t span = s[3] != 1 ? 1 : joined ? nh * D : D;
  if (joined) nh = 1;
  // rows that start on a line and span whole lines (aligned base and offsets): no straddle
  // check, one address multiply per token (what the loop below does, in fewer instructions)
  if (joined && span % line == 0 && (uintptr_t)x % 64 == 0 && s[0] % line == 0 && s[1] % line == 0 &&
      (h0 * s[2]) % line == 0) {
    const T* base = x + b * s[0] + h0 * s[2];
    for (int64_t i = 0; i < m; ++i) {
      const T* row = base + tok[i] * s[1];
      for (int64_t d = 0; d < span; d += line) pq.push(row + d);
    }
    return;
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t hh = 0; hh < nh; ++hh) {
      const T* row = x + offset4(s, b, tok[i], h0 + hh);
      for (int64_t d = 0; d < span; d += line) pq.push(row + d);
      const T* last = row + span - 1;  // the row may straddle one more line
      if (((uintptr_t)last >> 6) != ((uintptr_t)(row + (span - 1) / line * line) >> 6)) pq.push(last);
    }
}

// The work items' token lists, read kLookahead items ahead of their use, with their rows
// prefetched then: the gathers are random accesses over the whole sequence, and without
// this each item would wait on its cache misses one row at a time.
constexpr int kLookahead = 1;

template <class T>
static inline int64_t prefetch_queue_cap(int64_t wp, int64_t hpg, int64_t D, int64_t arrays) {
  return arrays * hpg * wp * prefetch_lines<T>(D);
}

struct ItemTokens {
  int64_t* tok;
  int64_t b, g, m;
};

template <class Prefetch>
struct TokenRing {
  ItemTokens slot[kLookahead + 1];
  const WindowAttentionParams& p;
  int64_t begin, end;
  Prefetch prefetch;
  PrefetchQueue queue;  // the rows of the item ahead, to be prefetched during this one

  // queue_cap: prefetch addresses per item, at most (see prefetch_queue_cap)
  TokenRing(const WindowAttentionParams& p_, char*& cursor, int64_t wp, int64_t queue_cap, int64_t begin_,
            int64_t end_, Prefetch pf)
      : p(p_), begin(begin_), end(end_), prefetch(pf) {
    for (int s = 0; s <= kLookahead; ++s) slot[s].tok = carve<int64_t>(cursor, wp);
    queue.addr = carve<const void*>(cursor, queue_cap);
    queue.cap = queue_cap;
    for (int64_t it = begin; it < end && it < begin + kLookahead; ++it) load(it);
    queue.drain();
  }
  void load(int64_t item) {
    ItemTokens& t = slot[(item - begin) % (kLookahead + 1)];
    t.m = window_tokens(p, item, t.tok, &t.b, &t.g);
    prefetch(t, queue);
  }
  // The tokens of `item` (called for begin, begin + 1, ... in order); queues the prefetches of
  // the item ahead (whatever the previous item left unissued is issued now).
  const ItemTokens& get(int64_t item) {
    queue.drain();
    if (item + kLookahead < end) load(item + kLookahead);
    return slot[(item - begin) % (kLookahead + 1)];
  }
  // Issue the queued prefetches spread over `steps` calls of pump().
  int64_t per_step(int64_t steps) const { return steps > 0 ? (queue.n + steps - 1) / steps : queue.n; }
  void pump(int64_t k) { queue.pump(k); }
};

// Bytes of scratch for the token ring: token lists and the prefetch queue (arrays: the number
// of row arrays prefetched per item).
template <class T>
static inline int64_t ring_bytes(int64_t wp, int64_t hpg, int64_t D, int64_t arrays) {
  return (kLookahead + 1) * round_up(wp * 8, 64) + round_up(prefetch_queue_cap<T>(wp, hpg, D, arrays) * 8, 64);
}

template <class Prefetch>
static inline TokenRing<Prefetch> make_ring(const WindowAttentionParams& p, char*& cursor, int64_t wp,
                                            int64_t queue_cap, int64_t begin, int64_t end, Prefetch pf) {
  return TokenRing<Prefetch>(p, cursor, wp, queue_cap, begin, end, pf);
}

}  // namespace rsir::cpu::RSIR_CPU_BUILD
