// dmfs-bench-client: bench/grpc_ops.py's client, speaking to dmfs's socket the
// way containerd does, through containerd's own proxy snapshotter client
// (github.com/containerd/containerd/snapshots/proxy, containerd 1.6.20 from
// Debian's golang-github-containerd-containerd-dev).
//
// Usage: dmfs-bench-client SOCKET stat COUNT PREFIX
//        dmfs-bench-client SOCKET ops COUNT PREFIX
// prints {"operation": [milliseconds, ...]} as JSON, as the Python client does.
// Build it with bench/grpc_client/build (GOPATH mode, Debian's Go sources, offline).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"google.golang.org/grpc"
)

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: dmfs-bench-client SOCKET stat|ops COUNT PREFIX")
		os.Exit(2)
	}
	socket, plan, prefix := os.Args[1], os.Args[2], os.Args[4]
	count, err := strconv.Atoi(os.Args[3])
	check(err)
	dial := func(ctx context.Context, address string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", address)
	}
	conn, err := grpc.Dial(socket, grpc.WithInsecure(), grpc.WithContextDialer(dial))
	check(err)
	defer conn.Close()
	snapshotter := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "dmfs")
	ctx := context.Background()
	samples := map[string][]float64{}
	timed := func(operation string, call func() error) {
		start := time.Now()
		check(call())
		samples[operation] = append(samples[operation],
			float64(time.Since(start).Nanoseconds())/1e6)
	}
	_, err = snapshotter.Stat(ctx, "existing-0") // connect first
	check(err)
	for run := 0; run < count; run++ {
		if plan == "stat" {
			timed("stat", func() error { _, err := snapshotter.Stat(ctx, "existing-0"); return err })
			continue
		}
		key := fmt.Sprintf("%s-%d", prefix, run)
		timed("prepare parentless", func() error {
			_, err := snapshotter.Prepare(ctx, key, "")
			return err
		})
		timed("commit", func() error { return snapshotter.Commit(ctx, key+"-c", key) })
		timed("prepare child", func() error {
			_, err := snapshotter.Prepare(ctx, key+"-child", "existing-0")
			return err
		})
		timed("remove", func() error { return snapshotter.Remove(ctx, key+"-child") })
		check(snapshotter.Remove(ctx, key+"-c"))
	}
	var _ snapshots.Snapshotter = snapshotter
	check(json.NewEncoder(os.Stdout).Encode(samples))
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "dmfs-bench-client:", err)
		os.Exit(1)
	}
}
