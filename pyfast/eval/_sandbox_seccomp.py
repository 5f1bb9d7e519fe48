"""The sandbox's seccomp filter: classic BPF built with struct, installed with seccomp(2).

Stdlib-only (imported by the bootstrap, which runs under ``python -I -S``). The program, checked
in this order for every system call:

1. ``seccomp_data.arch`` must be this machine's (AUDIT_ARCH_X86_64 or AUDIT_ARCH_AARCH64), else
   the process is killed; on x86_64 the x32 ABI (nr >= 0x40000000) is killed too. Other
   architectures have no table here: :func:`build` raises and strict mode refuses to run.
2. ``clone3`` -> ENOSYS (its flags live in memory a filter cannot read; glibc then uses clone).
3. ``clone`` with any namespace flag in its first argument -> EPERM; plain clone (fork, threads)
   is allowed.
4. Every call in :data:`DENIED` -> EPERM: new namespaces (unshare, setns), the mount family,
   pivot_root/chroot, the kernel keyring, bpf, ptrace and process_vm_*, io_uring,
   perf_event_open, kexec and module loading, userfaultfd, file handles and seccomp itself
   (no later filter can be stacked to confuse the next exec).
5. Everything else is allowed.
"""

import ctypes
import os
import struct

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000
# the kernel's numbers (arch/x86/entry/syscalls/syscall_64.tbl; include/uapi/asm-generic/unistd.h)
SYSCALLS = {
    "x86_64": {
        "clone": 56,
        "clone3": 435,
        "unshare": 272,
        "setns": 308,
        "mount": 165,
        "umount2": 166,
        "pivot_root": 155,
        "chroot": 161,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "mount_setattr": 442,
        "open_tree_attr": 467,
        "keyctl": 250,
        "add_key": 248,
        "request_key": 249,
        "bpf": 321,
        "ptrace": 101,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "perf_event_open": 298,
        "kexec_load": 246,
        "kexec_file_load": 320,
        "init_module": 175,
        "finit_module": 313,
        "delete_module": 176,
        "userfaultfd": 323,
        "name_to_handle_at": 303,
        "open_by_handle_at": 304,
        "seccomp": 317,
    },
    "aarch64": {
        "clone": 220,
        "clone3": 435,
        "unshare": 97,
        "setns": 268,
        "mount": 40,
        "umount2": 39,
        "pivot_root": 41,
        "chroot": 51,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "mount_setattr": 442,
        "open_tree_attr": 467,
        "keyctl": 219,
        "add_key": 217,
        "request_key": 218,
        "bpf": 280,
        "ptrace": 117,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "perf_event_open": 241,
        "kexec_load": 104,
        "kexec_file_load": 294,
        "init_module": 105,
        "finit_module": 273,
        "delete_module": 106,
        "userfaultfd": 282,
        "name_to_handle_at": 264,
        "open_by_handle_at": 265,
        "seccomp": 277,
    },
}
DENIED = tuple(n for n in SYSCALLS["x86_64"] if n not in ("clone", "clone3"))
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
CLONE_NS_FLAGS = 0x20000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
CLONE_NS_FLAGS |= 0x40000000 | 0x80
EPERM, ENOSYS = 1, 38

LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
RET_KILL_PROCESS, RET_ALLOW, RET_ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
OFF_NR, OFF_ARCH, OFF_ARG0 = 0, 4, 16  # struct seccomp_data; args[0] low word (little-endian)
SECCOMP_SET_MODE_FILTER = 1


def _ins(code, k, jt=0, jf=0):
    return (code, jt, jf, k)


def build(machine=None, deny=DENIED, errno=EPERM):
    """The filter as a list of (code, jt, jf, k). Raises OSError on an architecture without a
    table (the caller refuses strict mode)."""
    machine = machine or os.uname().machine
    if machine not in SYSCALLS:
        raise OSError(ENOSYS, f"seccomp: no syscall table for architecture {machine}")
    nrs = SYSCALLS[machine]
    kill, allow = _ins(RET_K, RET_KILL_PROCESS), _ins(RET_K, RET_ALLOW)
    prog = [_ins(LD_W_ABS, OFF_ARCH), _ins(JEQ_K, AUDIT_ARCH[machine], 1, 0), kill]
    prog.append(_ins(LD_W_ABS, OFF_NR))
    if machine == "x86_64":
        prog += [_ins(JGE_K, X32_SYSCALL_BIT, 0, 1), kill]
    if "clone3" in nrs and "clone3" not in deny:
        prog += [_ins(JEQ_K, nrs["clone3"], 0, 1), _ins(RET_K, RET_ERRNO | ENOSYS)]
    # clone: the flags are the first argument on both architectures
    prog += [
        _ins(JEQ_K, nrs["clone"], 0, 4),
        _ins(LD_W_ABS, OFF_ARG0),
        _ins(JSET_K, CLONE_NS_FLAGS, 0, 1),
        _ins(RET_K, RET_ERRNO | EPERM),
        allow,
    ]
    denied = [nrs[name] for name in deny if name in nrs and name != "clone"]
    # nr is reloaded: the clone branch above replaced the accumulator only on its own path
    for nr in denied:
        prog += [_ins(JEQ_K, nr, 0, 1), _ins(RET_K, RET_ERRNO | (errno & 0xFFFF))]
    prog.append(allow)
    return prog


def install(prog):
    """Installs `prog` on the calling thread (inherited by children and across execve); needs
    no_new_privs (or CAP_SYS_ADMIN). Raises OSError from seccomp(2)."""
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    nr = SYSCALLS.get(os.uname().machine, {}).get("seccomp")
    if nr is None:
        raise OSError(ENOSYS, "seccomp: unknown syscall number on this architecture")
    ret = libc.syscall(
        ctypes.c_long(nr),
        ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
        ctypes.c_uint(0),
        ctypes.byref(fprog),
    )
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp: {os.strerror(err)}")
