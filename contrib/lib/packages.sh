# Debian packages for dmfs; sourced by contrib/install and contrib/install-system.

# What dmfs needs to run, and to build pyfuse3 (which has no wheel: pip compiles it
# against libfuse3-dev): Python with venv, FUSE, device-mapper and thin-pool tools,
# mkfs for ext4 and xfs, losetup, getfattr/setfattr, patch (for contrib/pyfuse3).
dmfs_runtime_packages=(
	python3 python3-venv python3-dev gcc pkg-config libfuse3-dev fuse3
	kmod dmsetup thin-provisioning-tools e2fsprogs xfsprogs util-linux attr patch
)

# What the guest tests drive dmfs with as a proxy snapshotter (tests/support/containerd.py):
# containerd and ctr, runc for `ctr run`, and a static busybox as the test image's rootfs.
dmfs_test_packages=(containerd runc busybox-static)

# install_debian_packages PACKAGE...: apt-get install the ones not installed yet.
install_debian_packages() {
	local package missing=()
	for package in "$@"; do
		dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
			missing+=("$package")
	done
	((${#missing[@]})) || return 0
	printf '\n==> installing Debian packages: %s\n' "${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null &&
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			"${missing[@]}" >/dev/null ||
		{ echo "apt-get could not install ${missing[*]}" >&2; return 1; }
}
