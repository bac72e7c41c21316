/* C reference for the exit benchmark: the tightest userspace KVM_RUN loop, to compare with the monitor's.
 * Built by scripts/setup (or scripts/benchlib.py on demand) into build/libbench_exits.so and called
 * through ctypes with a vCPU that the Python side has set up, and the address of its mmap'ed kvm_run.
 *
 * Returns the number of KVM_EXIT_IO exits to nop_port seen before the guest wrote to exit_port (or before
 * max_exits of them), -(exit_reason + 1000) on any other exit, or -errno if KVM_RUN fails.
 */
#include <errno.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>

long vmft_c_exit_loop(int vcpu_fd, void *kvm_run, unsigned nop_port, unsigned exit_port, long max_exits);

long vmft_c_exit_loop(int vcpu_fd, void *kvm_run, unsigned nop_port, unsigned exit_port, long max_exits)
{
    struct kvm_run *run = kvm_run;
    long count = 0;

    while (count < max_exits) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0)
            return -(long)errno;
        if (run->exit_reason != KVM_EXIT_IO)
            return -((long)run->exit_reason + 1000);
        if (run->io.port == nop_port) {
            count++;
            continue;
        }
        if (run->io.port == exit_port)
            return count;
        return -((long)run->exit_reason + 1000);
    }
    return count;
}
