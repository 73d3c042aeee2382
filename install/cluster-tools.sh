#!/usr/bin/env bash
# Installs the cluster tools the multi-host tests run for real: OpenSSH's server and client,
# Open MPI, and Slurm with munge. Debian's policy-rc.d keeps apt from starting their daemons;
# the tests start and stop their own. Needs root for apt-get.
set -euo pipefail
needed=(sshd:openssh-server ssh:openssh-client mpiexec:openmpi-bin slurmctld:slurmctld
        slurmd:slurmd sbatch:slurm-client munged:munge)
missing=()
for pair in "${needed[@]}"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install/cluster-tools.sh: missing ${missing[*]}; as root run: apt-get install -y ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
