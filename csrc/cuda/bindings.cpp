// Torch glue of the `cuda` backend: input checks, output allocation, dtype dispatch and the Python
// bindings (submodule ``ibkd._C.cuda``). The kernels themselves live in infonce.cu / hsic.cu behind
// the plain interface of api.cuh. csrc/cpu/module.cpp calls register_cuda_bindings() when the
// extension is built with IBKD_WITH_CUDA.
//
// Streams: c10::cuda::getCurrentCUDAStream() (what at::cuda::getCurrentCUDAStream() forwards to),
// so the kernels order correctly with the surrounding PyTorch work, CUDA graphs included.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <string>
#include <tuple>

#include "api.cuh"

namespace {

using at::Tensor;

template <typename S> struct DeviceScalar { using type = S; };
template <> struct DeviceScalar<at::Half> { using type = __half; };
template <> struct DeviceScalar<at::BFloat16> { using type = __nv_bfloat16; };

// rows/columns stay well inside int: the kernels index tiles with int and rows·cols with int64
constexpr int64_t kMaxExtent = INT_MAX - 1024;

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_matrix(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "ibkd cuda backend: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 2, "ibkd cuda backend: ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "ibkd cuda backend: ", name, " must be contiguous");
  TORCH_CHECK(t.size(0) >= 1 && t.size(1) >= 1, "ibkd cuda backend: ", name,
              " needs at least one row and one column, got shape ", t.sizes());
  TORCH_CHECK(t.size(0) <= kMaxExtent && t.size(1) <= kMaxExtent, "ibkd cuda backend: ", name, " shape ",
              t.sizes(), " is too large (each dimension must stay below 2^31 - 1024)");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "ibkd cuda backend: ", name, " must be float16, bfloat16, float32 or float64, got ", st);
}

void check_same(const Tensor& a, const char* name_a, const Tensor& b, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), "ibkd cuda backend: ", name_a, " and ", name_b,
              " must be on the same device, got ", a.device(), " and ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "ibkd cuda backend: ", name_a, " and ", name_b,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

// A small accumulation-dtype operand (scalar or vector) on the inputs' device, made contiguous in
// the accumulation dtype if the caller passed another floating dtype.
Tensor acc_operand(const Tensor& t, const char* name, int64_t numel, const Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "ibkd cuda backend: ", name, " must be on ", like.device(), ", got ",
              t.device());
  TORCH_CHECK(t.numel() == numel, "ibkd cuda backend: ", name, " must have ", numel, " element(s), got shape ",
              t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "ibkd cuda backend: ", name, " must be floating, got ",
              t.scalar_type());
  return t.to(acc_type(like.scalar_type())).contiguous();
}

template <typename S> const typename DeviceScalar<S>::type* dev_ptr(const Tensor& t) {
  return reinterpret_cast<const typename DeviceScalar<S>::type*>(t.data_ptr<S>());
}
template <typename S> typename DeviceScalar<S>::type* dev_ptr_mut(Tensor& t) {
  return reinterpret_cast<typename DeviceScalar<S>::type*>(t.data_ptr<S>());
}

// ------------------------------------------------------------------------------------ InfoNCE

// The shape contract of both InfoNCE entry points (the Python layer checks it too; this guards direct calls).
void check_infonce_operands(const Tensor& q, const Tensor& k, bool symmetric) {
  check_matrix(q, "q");
  check_matrix(k, "k");
  check_same(q, "q", k, "k");
  const int64_t B = q.size(0), N = k.size(0), D = q.size(1);
  TORCH_CHECK(k.size(1) == D, "ibkd cuda backend: q and k must have the same feature dimension, got ", D, " and ",
              k.size(1));
  TORCH_CHECK(N >= B, "ibkd cuda backend: k needs at least as many rows as q (N >= B), got N=", N, ", B=", B);
  TORCH_CHECK(!symmetric || N == B, "ibkd cuda backend: symmetric needs N == B, got N=", N, ", B=", B);
}

std::tuple<Tensor, Tensor> infonce_forward(const Tensor& q, const Tensor& k, const Tensor& inv_temp, bool symmetric) {
  check_infonce_operands(q, k, symmetric);
  const int64_t B = q.size(0), N = k.size(0), D = q.size(1);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor c = acc_operand(inv_temp, "inv_temp", 1, q);
  const auto acc_opts = q.options().dtype(acc_type(q.scalar_type()));
  Tensor lse = at::empty({symmetric ? 2 * B : B}, acc_opts);
  Tensor pos = at::empty({B}, acc_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ibkd_cuda_infonce_forward", [&] {
    using T = typename DeviceScalar<scalar_t>::type;
    using A = ibkd_cuda::acc_of<T>;
    C10_CUDA_CHECK(ibkd_cuda::launch_infonce_forward<T>(dev_ptr<scalar_t>(q), dev_ptr<scalar_t>(k), int(B), int(N),
                                                        int(D), c.data_ptr<A>(), symmetric, lse.data_ptr<A>(),
                                                        pos.data_ptr<A>(), stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Tensor row_loss = symmetric ? (lse.narrow(0, 0, B) + lse.narrow(0, B, B)) * 0.5 - pos : lse - pos;
  return {row_loss, lse};
}

std::tuple<Tensor, Tensor, Tensor> infonce_backward(const Tensor& grad_rows, const Tensor& q, const Tensor& k,
                                                    const Tensor& inv_temp, const Tensor& lse, bool symmetric) {
  check_infonce_operands(q, k, symmetric);
  const int64_t B = q.size(0), N = k.size(0), D = q.size(1);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor c = acc_operand(inv_temp, "inv_temp", 1, q);
  const Tensor w = acc_operand(grad_rows, "grad_rows", B, q);
  const Tensor saved_lse = acc_operand(lse, "lse", symmetric ? 2 * B : B, q);
  const Tensor w_absmax = w.abs().amax();
  Tensor dq = at::empty_like(q);
  Tensor dk = at::empty_like(k);
  Tensor dinv = at::empty({}, q.options().dtype(acc_type(q.scalar_type())));
  Tensor partials = at::empty({ibkd_cuda::num_row_blocks(int(B))}, q.options().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ibkd_cuda_infonce_backward", [&] {
    using T = typename DeviceScalar<scalar_t>::type;
    using A = ibkd_cuda::acc_of<T>;
    ibkd_cuda::InfoNCEBackwardArgs<T> a{};
    a.q = dev_ptr<scalar_t>(q);
    a.k = dev_ptr<scalar_t>(k);
    a.B = int(B);
    a.N = int(N);
    a.D = int(D);
    a.inv_temp = c.data_ptr<A>();
    a.lse = saved_lse.data_ptr<A>();
    a.grad_rows = w.data_ptr<A>();
    a.grad_absmax = w_absmax.data_ptr<A>();
    a.symmetric = symmetric;
    a.dq = dev_ptr_mut<scalar_t>(dq);
    a.dk = dev_ptr_mut<scalar_t>(dk);
    a.dinv = dinv.data_ptr<A>();
    a.dinv_partials = partials.data_ptr<double>();
    C10_CUDA_CHECK(ibkd_cuda::launch_infonce_backward<T>(a, stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dinv};
}

// ---------------------------------------------------------------------------------------- HSIC

bool parse_kernel(const std::string& kernel) {
  TORCH_CHECK(kernel == "rbf" || kernel == "linear", "ibkd cuda backend: kernel must be 'rbf' or 'linear', got '",
              kernel, "'");
  return kernel == "rbf";
}

void check_hsic_inputs(const Tensor& x, const Tensor& z) {
  check_matrix(x, "x");
  check_matrix(z, "z");
  check_same(x, "x", z, "z");
  TORCH_CHECK(x.size(0) == z.size(0), "ibkd cuda backend: x and z must have the same number of rows, got ",
              x.size(0), " and ", z.size(0));
}

template <typename S> ibkd_cuda::HsicArgs<typename DeviceScalar<S>::type> hsic_args(
    const Tensor& x, const Tensor& z, const Tensor& gammas, bool rbf, Tensor& sq_x, Tensor& sq_z) {
  using T = typename DeviceScalar<S>::type;
  using A = ibkd_cuda::acc_of<T>;
  ibkd_cuda::HsicArgs<T> a{};
  a.x = dev_ptr<S>(x);
  a.z = dev_ptr<S>(z);
  a.n = int(x.size(0));
  a.dx = int(x.size(1));
  a.dz = int(z.size(1));
  a.gammas = gammas.data_ptr<A>();
  a.rbf = rbf;
  a.sqnorm_x = sq_x.data_ptr<A>();
  a.sqnorm_z = sq_z.data_ptr<A>();
  return a;
}

std::tuple<Tensor, Tensor, Tensor> hsic_stats(const Tensor& x, const Tensor& z, const Tensor& gammas,
                                              const std::string& kernel) {
  check_hsic_inputs(x, z);
  const bool rbf = parse_kernel(kernel);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor g = acc_operand(gammas, "gammas", 2, x);
  const int64_t n = x.size(0);
  const auto acc_opts = x.options().dtype(acc_type(x.scalar_type()));
  Tensor sq_x = at::empty({n}, acc_opts), sq_z = at::empty({n}, acc_opts);
  Tensor sums = at::empty({3}, acc_opts);
  Tensor rowsum_k = at::empty({n}, acc_opts), rowsum_l = at::empty({n}, acc_opts);
  Tensor partials = at::empty({3 * ibkd_cuda::num_row_blocks(int(n))}, x.options().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ibkd_cuda_hsic_stats", [&] {
    using T = typename DeviceScalar<scalar_t>::type;
    using A = ibkd_cuda::acc_of<T>;
    const auto a = hsic_args<scalar_t>(x, z, g, rbf, sq_x, sq_z);
    if (rbf) C10_CUDA_CHECK(ibkd_cuda::launch_hsic_sqnorms<T>(a, stream));
    C10_CUDA_CHECK(ibkd_cuda::launch_hsic_stats<T>(a, sums.data_ptr<A>(), rowsum_k.data_ptr<A>(),
                                                   rowsum_l.data_ptr<A>(), partials.data_ptr<double>(), stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sums, rowsum_k, rowsum_l};
}

std::tuple<Tensor, Tensor> hsic_stats_backward(const Tensor& grad_sums, const Tensor& grad_rowsum_k,
                                               const Tensor& grad_rowsum_l, const Tensor& x, const Tensor& z,
                                               const Tensor& gammas, const std::string& kernel) {
  check_hsic_inputs(x, z);
  const bool rbf = parse_kernel(kernel);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = x.size(0);
  const Tensor g = acc_operand(gammas, "gammas", 2, x);
  const Tensor gs = acc_operand(grad_sums, "grad_sums", 3, x);
  const Tensor grk = acc_operand(grad_rowsum_k, "grad_rowsum_k", n, x);
  const Tensor grl = acc_operand(grad_rowsum_l, "grad_rowsum_l", n, x);
  const auto acc_opts = x.options().dtype(acc_type(x.scalar_type()));
  Tensor sq_x = at::empty({n}, acc_opts), sq_z = at::empty({n}, acc_opts);
  Tensor dx = at::empty_like(x), dz = at::empty_like(z);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ibkd_cuda_hsic_backward", [&] {
    using T = typename DeviceScalar<scalar_t>::type;
    using A = ibkd_cuda::acc_of<T>;
    const auto a = hsic_args<scalar_t>(x, z, g, rbf, sq_x, sq_z);
    C10_CUDA_CHECK(ibkd_cuda::launch_hsic_sqnorms<T>(a, stream));
    // Bounds on |W^x|, |W^z| (see hsic.cu), computed on the device without a host sync: rbf kernel
    // values lie in (0, 1]; linear ones satisfy |x_i·x_j| ≤ max_i ‖x_i‖² (Cauchy–Schwarz).
    const Tensor ga = gs.abs();
    const Tensor mk = grk.abs().amax(), ml = grl.abs().amax();
    Tensor bx, bz;
    if (rbf) {
      bx = 2 * ga[0] + 4 * ga[1] + 2 * mk;
      bz = 2 * ga[0] + 4 * ga[2] + 2 * ml;
    } else {
      const Tensor mx = sq_x.amax(), mz = sq_z.amax();
      bx = 2 * ga[0] * mz + 4 * ga[1] * mx + 2 * mk;
      bz = 2 * ga[0] * mx + 4 * ga[2] * mz + 2 * ml;
    }
    const Tensor bounds = at::stack({bx, bz}).contiguous();
    C10_CUDA_CHECK(ibkd_cuda::launch_hsic_backward<T>(a, gs.data_ptr<A>(), grk.data_ptr<A>(), grl.data_ptr<A>(),
                                                      bounds.data_ptr<A>(), dev_ptr_mut<scalar_t>(dx),
                                                      dev_ptr_mut<scalar_t>(dz), stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dz};
}

}  // namespace

void register_cuda_bindings(pybind11::module_& m) {
  namespace py = pybind11;
  auto cu = m.def_submodule("cuda", "CUDA kernels of ibkd's `cuda` backend (contract: ibkd/backend/base.py)");
  cu.def("infonce_forward", &infonce_forward, "InfoNCE forward: (row_loss, lse)", py::arg("q"), py::arg("k"),
         py::arg("inv_temp"), py::arg("symmetric"));
  cu.def("infonce_backward", &infonce_backward, "InfoNCE backward: (dq, dk, dinv_temp)", py::arg("grad_rows"),
         py::arg("q"), py::arg("k"), py::arg("inv_temp"), py::arg("lse"), py::arg("symmetric"));
  cu.def("hsic_stats", &hsic_stats, "HSIC statistics: (sums, rowsum_k, rowsum_l)", py::arg("x"), py::arg("z"),
         py::arg("gammas"), py::arg("kernel"));
  cu.def("hsic_stats_backward", &hsic_stats_backward, "VJP of hsic_stats: (dx, dz)", py::arg("grad_sums"),
         py::arg("grad_rowsum_k"), py::arg("grad_rowsum_l"), py::arg("x"), py::arg("z"), py::arg("gammas"),
         py::arg("kernel"));
}
