// bnnshift packed binary conv / linear: XNOR + popcount on CPU (layout: runtime/ref.py).
// One op: bconv2d; a linear layer is a 1x1 conv on a 1x1 input. Multi-threaded with
// at::parallel_for over (image, output row, block of output channels).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <vector>

namespace {

template <typename T>
void pack_act(const T* x, uint64_t* out, int64_t N, int64_t C, int64_t H, int64_t W, int64_t G, int64_t Cw) {
  // one image row at a time: 64 channel rows OR-ed into W words (vectorised, no branch), then
  // stored pixel-major (N, H, W, G, Cw)
  const int64_t Cg = C / G;
  at::parallel_for(0, N * H, 1, [=](int64_t b, int64_t e) {  // by value: a store to acc cannot alias W
    std::vector<uint64_t> acc(W);
    for (int64_t nh = b; nh < e; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      uint64_t* o = out + nh * W * G * Cw;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < Cw; ++j) {
          std::fill(acc.begin(), acc.end(), 0ull);
          const int64_t k1 = std::min<int64_t>(64, Cg - j * 64);
          for (int64_t k = 0; k < k1; ++k) {
            const T* src = x + ((n * C + g * Cg + j * 64 + k) * H + h) * W;
            const uint64_t bit = 1ull << k;
            for (int64_t w = 0; w < W; ++w) acc[w] |= src[w] > 0 ? bit : 0ull;
          }
          for (int64_t w = 0; w < W; ++w) o[w * G * Cw + g * Cw + j] = acc[w];
        }
    }
  });
}

template <typename T>
void pack_act_nhwc(const T* x, uint64_t* out, int64_t N, int64_t C, int64_t H, int64_t W, int64_t G, int64_t Cw) {
  // x in channels-last memory (N, H, W, C): one pixel's channels are contiguous, 64 of them -> one word
  const int64_t Cg = C / G;
  at::parallel_for(0, N * H * W, 64, [=](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const T* src = x + p * C;
      uint64_t* o = out + p * G * Cw;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < Cw; ++j) {
          const T* s = src + g * Cg + j * 64;
          const int64_t k1 = std::min<int64_t>(64, Cg - j * 64);
          uint64_t word = 0;
          for (int64_t k = 0; k < k1; ++k) word |= static_cast<uint64_t>(s[k] > 0) << k;
          o[g * Cw + j] = word;
        }
    }
  });
}

template <typename T>
void pack_any(const torch::Tensor& x, uint64_t* out, int64_t N, int64_t C, int64_t H, int64_t W, int64_t G,
              int64_t Cw) {
  if (x.is_contiguous()) pack_act<T>(x.data_ptr<T>(), out, N, C, H, W, G, Cw);
  else pack_act_nhwc<T>(x.data_ptr<T>(), out, N, C, H, W, G, Cw);
}

template <int B>
inline int64_t block(int64_t og, int64_t og1, int64_t* sp, const uint64_t* buf, const uint64_t* wg, const char* valid,
                     int64_t taps, int64_t Cw, int64_t Og, bool zero_one) {
  for (; og + B <= og1; og += B) {
    int64_t acc[B] = {0};
    for (int64_t t = 0; t < taps; ++t) {
      // +-1 input: a padded tap is a 0, skipped; {0,1} input: its zero word gives popcount(w), cancelled below
      if (!valid[t] && !zero_one) continue;
      for (int64_t c = 0; c < Cw; ++c) {
        const uint64_t xk = buf[t * Cw + c];
        const uint64_t* wr = wg + (t * Cw + c) * Og + og;
        for (int i = 0; i < B; ++i) acc[i] += __builtin_popcountll(xk ^ wr[i]);
      }
    }
    for (int i = 0; i < B; ++i) sp[og + i] = acc[i];
  }
  return og;
}

// R: the stored result type; emit(o, dot) -> R, the epilogue of one output (float y, or a threshold bit)
template <typename R, typename Emit>
void conv(const uint64_t* a, const uint64_t* wt, const int32_t* popw, Emit emit, R* out,
          int64_t N, int64_t H, int64_t W, int64_t G, int64_t Cw, int64_t Cg, int64_t O, int64_t KH, int64_t KW,
          int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t Ho, int64_t Wo,
          bool zero_one, bool nhwc = false) {
  const int64_t Og = O / G, taps = KH * KW, K = taps * Cw;
  // wt: the weights transposed to (G, K, Og) once at pack time: the inner loop runs over output
  // channels, contiguous, one input word against Og weight words (VPOPCNTQ with AVX-512, else popcnt)
  std::vector<int64_t> pwsum(O, 0);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t t = 0; t < taps; ++t) pwsum[o] += popw[o * taps + t];
  const int64_t units = N * Ho * G, threads = at::get_num_threads();
  int64_t nob = 1;
  if (units < 4 * threads) nob = std::max<int64_t>(1, std::min((4 * threads + units - 1) / units, (Og + 7) / 8));
  const int64_t obs = (((Og + nob - 1) / nob) + 7) / 8 * 8;
  const uint64_t* wTp = wt;
  const int64_t* pws = pwsum.data();
  at::parallel_for(0, units * nob, 1, [=](int64_t b, int64_t e) {  // by value: stores cannot alias the sizes
    std::vector<int64_t> s(Og);
    std::vector<uint64_t> buf(K);
    std::vector<R> tile(obs * Wo);  // outputs of one row, written out channel by channel
    std::vector<char> valid(taps);
    for (int64_t it = b; it < e; ++it) {
      const int64_t ob = it % nob, rest = it / nob, g = rest % G, nh = rest / G, n = nh / Ho, oh = nh % Ho;
      const int64_t og0 = ob * obs, og1 = std::min(Og, og0 + obs);
      if (og0 >= og1) continue;
      const uint64_t* wg = wTp + g * K * Og;
      for (int64_t ow = 0; ow < Wo; ++ow) {
        int64_t nvalid = 0;
        for (int64_t i = 0; i < KH; ++i)
          for (int64_t j = 0; j < KW; ++j) {
            const int64_t ih = oh * sh - ph + i * dh, iw = ow * sw - pw + j * dw, t = i * KW + j;
            const bool v = ih >= 0 && ih < H && iw >= 0 && iw < W;
            valid[t] = v;
            nvalid += v;
            uint64_t* dst = buf.data() + t * Cw;
            if (v) {
              const uint64_t* src = a + ((n * H + ih) * W + iw) * G * Cw + g * Cw;
              for (int64_t k = 0; k < Cw; ++k) dst[k] = src[k];
            } else {
              for (int64_t k = 0; k < Cw; ++k) dst[k] = 0;
            }
          }
        int64_t* sp = s.data();
        // 32 (then 16, 8) output channels at a time, their sums kept in registers across all taps and words
        int64_t og = og0;
        og = block<32>(og, og1, sp, buf.data(), wg, valid.data(), taps, Cw, Og, zero_one);
        og = block<16>(og, og1, sp, buf.data(), wg, valid.data(), taps, Cw, Og, zero_one);
        og = block<8>(og, og1, sp, buf.data(), wg, valid.data(), taps, Cw, Og, zero_one);
        for (int64_t r = og; r < og1; ++r) sp[r] = 0;
        for (int64_t t = 0; t < taps && og < og1; ++t) {
          if (!valid[t] && !zero_one) continue;
          for (int64_t c = 0; c < Cw; ++c) {
            const uint64_t xk = buf[t * Cw + c];
            const uint64_t* wr = wg + (t * Cw + c) * Og;
            for (int64_t r = og; r < og1; ++r) sp[r] += __builtin_popcountll(xk ^ wr[r]);
          }
        }
        for (int64_t og = og0; og < og1; ++og) {
          const int64_t o = g * Og + og;
          // +-1: sum over valid taps of (Cg - 2 popcount(a ^ w)); {0,1}: sum of popcount(w) - popcount(a ^ w)
          const int64_t dot = zero_one ? pws[o] - sp[og] : nvalid * Cg - 2 * sp[og];
          tile[(og - og0) * Wo + ow] = emit(o, dot);
        }
      }
      if (nhwc) {  // (N, Ho, Wo, O): one output pixel's channels contiguous
        for (int64_t ow = 0; ow < Wo; ++ow) {
          R* dst = out + ((n * Ho + oh) * Wo + ow) * O + g * Og;
          for (int64_t og = og0; og < og1; ++og) dst[og] = tile[(og - og0) * Wo + ow];
        }
      } else {
        for (int64_t og = og0; og < og1; ++og)
          std::copy(tile.begin() + (og - og0) * Wo, tile.begin() + (og - og0 + 1) * Wo,
                    out + ((n * O + g * Og + og) * Ho + oh) * Wo);
      }
    }
  });
}

}  // namespace

torch::Tensor bconv2d(torch::Tensor x, torch::Tensor wwords, torch::Tensor wtrans, torch::Tensor popw, torch::Tensor alpha,
                      c10::optional<torch::Tensor> bias, std::vector<int64_t> stride, std::vector<int64_t> padding,
                      std::vector<int64_t> dilation, int64_t groups, bool zero_one) {
  TORCH_CHECK(x.dim() == 4, "bconv2d: x must be (N, C, H, W)");
  TORCH_CHECK(wwords.scalar_type() == torch::kInt64 && popw.scalar_type() == torch::kInt32, "bconv2d: bad packed weight");
  if (!x.is_contiguous(at::MemoryFormat::ChannelsLast)) x = x.contiguous();  // NCHW or channels-last memory
  wwords = wwords.contiguous();
  wtrans = wtrans.contiguous();
  TORCH_CHECK(wtrans.numel() == wwords.numel(), "bconv2d: bad transposed weight");
  popw = popw.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = wwords.size(0), KH = wwords.size(1), KW = wwords.size(2), Cw = wwords.size(3);
  const int64_t G = groups, Cg = C / G;
  TORCH_CHECK(C % G == 0 && O % G == 0 && (Cg + 63) / 64 == Cw, "bconv2d: channels do not match the packed weight");
  const int64_t Ho = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) / stride[0] + 1;
  const int64_t Wo = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) / stride[1] + 1;
  auto a = torch::empty({N, H, W, G * Cw}, x.options().dtype(torch::kInt64));
  auto out = torch::empty({N, O, Ho, Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bconv2d", [&] {
    auto al = alpha.to(x.scalar_type()).contiguous();
    torch::Tensor bi;
    if (bias && bias->defined()) bi = bias->to(x.scalar_type()).contiguous();
    pack_any<scalar_t>(x, reinterpret_cast<uint64_t*>(a.data_ptr<int64_t>()), N, C, H, W, G, Cw);
    const scalar_t* alp = al.data_ptr<scalar_t>();
    const scalar_t* bip = bi.defined() ? bi.data_ptr<scalar_t>() : nullptr;
    auto emit = [alp, bip](int64_t o, int64_t dot) {
      scalar_t y = static_cast<scalar_t>(dot) * alp[o];
      return bip ? static_cast<scalar_t>(y + bip[o]) : y;
    };
    conv<scalar_t>(reinterpret_cast<const uint64_t*>(a.data_ptr<int64_t>()),
                   reinterpret_cast<const uint64_t*>(wtrans.data_ptr<int64_t>()), popw.data_ptr<int32_t>(),
                   emit, out.data_ptr<scalar_t>(),
                   N, H, W, G, Cw, Cg, O, KH, KW, stride[0], stride[1], padding[0], padding[1], dilation[0],
                   dilation[1], Ho, Wo, zero_one);
  });
  return out;
}

// The same conv with the following BatchNorm (+ folded t) and binary activation as one per-channel
// integer threshold on the dot product: u = dot >= thr[o]; the bit is u XOR flip[o] (flip where the
// activation decreases with the dot: gamma * alpha < 0). A MaxPool before the activation is an OR of u
// over the window (max of the dot), one after it an OR of the bits. Output: hi where the bit is 1, else lo.
torch::Tensor bconv2d_bits(torch::Tensor x, torch::Tensor wwords, torch::Tensor wtrans, torch::Tensor popw,
                           torch::Tensor thr, torch::Tensor flip, std::vector<int64_t> stride,
                           std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, bool zero_one,
                           std::vector<int64_t> pool, bool pool_first, double lo, double hi) {
  TORCH_CHECK(x.dim() == 4, "bconv2d_bits: x must be (N, C, H, W)");
  TORCH_CHECK(thr.scalar_type() == torch::kInt64 && flip.scalar_type() == torch::kBool, "bconv2d_bits: bad threshold");
  TORCH_CHECK(pool.empty() || pool.size() == 4, "bconv2d_bits: pool is (kh, kw, sh, sw) or empty");
  if (!x.is_contiguous(at::MemoryFormat::ChannelsLast)) x = x.contiguous();  // NCHW or channels-last memory
  wwords = wwords.contiguous();
  wtrans = wtrans.contiguous();
  popw = popw.contiguous();
  thr = thr.contiguous();
  flip = flip.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = wwords.size(0), KH = wwords.size(1), KW = wwords.size(2), Cw = wwords.size(3);
  const int64_t G = groups, Cg = C / G;
  TORCH_CHECK(C % G == 0 && O % G == 0 && (Cg + 63) / 64 == Cw && thr.numel() == O && flip.numel() == O,
              "bconv2d_bits: channels do not match the packed weight");
  const int64_t Ho = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) / stride[0] + 1;
  const int64_t Wo = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) / stride[1] + 1;
  auto a = torch::empty({N, H, W, G * Cw}, x.options().dtype(torch::kInt64));
  auto u = torch::empty({N, Ho, Wo, O}, x.options().dtype(torch::kUInt8));  // channels last: the next layer packs
  // one pixel's channels from contiguous memory
  const int64_t* th = thr.data_ptr<int64_t>();
  const bool* fl = flip.data_ptr<bool>();
  const bool pooled = !pool.empty();
  const int64_t pkh = pooled ? pool[0] : 1, pkw = pooled ? pool[1] : 1, psh = pooled ? pool[2] : 1,
                psw = pooled ? pool[3] : 1;
  const int64_t Hp = (Ho - pkh) / psh + 1, Wp = (Wo - pkw) / psw + 1;
  auto out = torch::empty({N, O, Hp, Wp}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bconv2d_bits", [&] {
    pack_any<scalar_t>(x, reinterpret_cast<uint64_t*>(a.data_ptr<int64_t>()), N, C, H, W, G, Cw);
    // without a pool after the activation, the flip is applied here (a pool before it ORs u, flipped below)
    const bool flip_now = !pooled;
    auto emit = [th, fl, flip_now](int64_t o, int64_t dot) {
      const bool b = dot >= th[o];
      return static_cast<uint8_t>(flip_now ? (b != fl[o]) : b);
    };
    conv<uint8_t>(reinterpret_cast<const uint64_t*>(a.data_ptr<int64_t>()),
                  reinterpret_cast<const uint64_t*>(wtrans.data_ptr<int64_t>()), popw.data_ptr<int32_t>(), emit,
                  u.data_ptr<uint8_t>(), N, H, W, G, Cw, Cg, O, KH, KW, stride[0], stride[1], padding[0], padding[1],
                  dilation[0], dilation[1], Ho, Wo, zero_one, true);
    const uint8_t* up = u.data_ptr<uint8_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t vlo = static_cast<scalar_t>(lo), vhi = static_cast<scalar_t>(hi);
    const uint8_t* flp = reinterpret_cast<const uint8_t*>(fl);
    if (!pooled) {
      at::parallel_for(0, N * Ho * Wo * O, 4096, [=](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) op[i] = up[i] ? vhi : vlo;
      });
      return;
    }
    at::parallel_for(0, N * Hp, 1, [=](int64_t b, int64_t e) {
      std::vector<uint8_t> any(O), anyflip(O);
      for (int64_t nh = b; nh < e; ++nh) {
        const int64_t n = nh / Hp, i = nh % Hp;
        for (int64_t j = 0; j < Wp; ++j) {
          std::fill(any.begin(), any.end(), 0);
          std::fill(anyflip.begin(), anyflip.end(), 0);
          for (int64_t r = 0; r < pkh; ++r)
            for (int64_t c = 0; c < pkw; ++c) {
              const uint8_t* src = up + ((n * Ho + i * psh + r) * Wo + j * psw + c) * O;
              for (int64_t o = 0; o < O; ++o) {
                any[o] |= src[o];
                anyflip[o] |= src[o] ^ flp[o];
              }
            }
          scalar_t* dst = op + ((n * Hp + i) * Wp + j) * O;
          for (int64_t o = 0; o < O; ++o) dst[o] = (pool_first ? (any[o] ^ flp[o]) : anyflip[o]) ? vhi : vlo;
        }
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bconv2d", &bconv2d, "packed binary conv2d (XNOR + popcount)");
  m.def("bconv2d_bits", &bconv2d_bits, "packed binary conv2d with an integer threshold emitting binary activations");
}
