// An AVX2-only x86 CPU, as every library in a process sees it: preloaded (LD_PRELOAD) into a process on an
// AVX-512 machine, this library makes the CPUID instruction fault (Linux's arch_prctl(ARCH_SET_CPUID, 0), where
// the CPU supports CPUID faulting: the "cpuid_fault" flag) and answers each CPUID from a signal handler with
// the real answer minus AVX-512, AMX, AVX-VNNI and AVX512-BF16, and with no ZMM/opmask state in the XSAVE
// leaf. AVX2, FMA and F16C stay: an AMD Zen 3 kind of CPU. torch, oneDNN, MKL, OpenVINO, ONNX Runtime and our
// extension all then take their AVX2 code paths; environment caps such as ONEDNN_MAX_CPU_ISA reach only some of
// them (torch still reads VNNI from CPUID and picks its int8 GEMM by it).
//
// Build: gcc -O2 -shared -fPIC -o cpuid_avx2.so cpuid_avx2.c. Used by tests/ops/test_cpu_isa.py and
// bench/as_avx2.sh. The process must not replace the SIGSEGV handler afterwards (run pytest with
// -p no:faulthandler). Speed measured this way is the machine's own at 256-bit width, not an AVX2 CPU's.
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static int allow_cpuid(int on) { return (int)syscall(SYS_arch_prctl, ARCH_SET_CPUID, on); }

static uint32_t bit(int i) { return 1u << i; }

static void on_fault(int sig, siginfo_t* info, void* context) {
  (void)info;
  greg_t* r = ((ucontext_t*)context)->uc_mcontext.gregs;
  const uint8_t* ip = (const uint8_t*)r[REG_RIP];
  if (ip[0] != 0x0F || ip[1] != 0xA2) {  // a real fault, not CPUID: let it kill the process as it would have
    signal(sig, SIG_DFL);
    return;
  }
  const uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX];
  uint32_t a, b, c, d;
  allow_cpuid(1);
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(sub));
  allow_cpuid(0);
  if (leaf == 7 && sub == 0) {
    // EBX: avx512f, dq, ifma, pf, er, cd, bw, vl. ECX: vbmi, vbmi2, vnni, bitalg, vpopcntdq.
    // EDX: 4vnniw, 4fmaps, vp2intersect, amx_bf16, avx512_fp16, amx_tile, amx_int8.
    b &= ~(bit(16) | bit(17) | bit(21) | bit(26) | bit(27) | bit(28) | bit(30) | bit(31));
    c &= ~(bit(1) | bit(6) | bit(11) | bit(12) | bit(14));
    d &= ~(bit(2) | bit(3) | bit(8) | bit(22) | bit(23) | bit(24) | bit(25));
  } else if (leaf == 7 && sub == 1) {
    a &= ~(bit(4) | bit(5));  // avx_vnni, avx512_bf16
  } else if (leaf == 0xD && sub == 0) {
    a &= ~(bit(5) | bit(6) | bit(7));  // the XSAVE components: opmask, ZMM_Hi256, Hi16_ZMM
  }
  r[REG_RAX] = a;
  r[REG_RBX] = b;
  r[REG_RCX] = c;
  r[REG_RDX] = d;
  r[REG_RIP] += 2;  // past the CPUID instruction (0F A2)
}

__attribute__((constructor)) static void mask_cpuid(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigaction(SIGSEGV, &sa, NULL);
  if (allow_cpuid(0) != 0) {
    perror("cpuid_avx2: arch_prctl(ARCH_SET_CPUID, 0) (no CPUID faulting on this machine)");
    exit(3);
  }
}
