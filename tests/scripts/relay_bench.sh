#!/bin/bash
# What the relay costs: a 2-PNode mesh training models/mnist-mlp.toml, one PNode on this machine
# and one in a network namespace of its own (veth), reached directly (MODE=direct) or through
# the orchestrator's relay (MODE=relayed, `--behind-nat`); the only difference is the relay.
# Needs root and iproute2. Run from the repository root after a release build:
#   bash tests/scripts/relay_bench.sh direct 600; bash tests/scripts/relay_bench.sh relayed 600
set -u
MODE=$1; STEPS=$2
B=${DCNR_BIN:-target/release}
NS=dcnr-natbench
ip netns del $NS 2>/dev/null
ip netns add $NS
ip link add nbh0 type veth peer name nbn0
ip link set nbn0 netns $NS
ip addr add 10.214.0.1/30 dev nbh0; ip link set nbh0 up
ip -n $NS addr add 10.214.0.2/30 dev nbn0; ip -n $NS link set nbn0 up; ip -n $NS link set lo up
ip -n $NS route add default via 10.214.0.1
T=$(mktemp -d); export DCNR_TLS_DIR=$T/tls RUST_LOG=error
$B/orchestrator serve --listen 10.214.0.1:0 --store $T/store --relay-listen 10.214.0.1:0 --data ${DCNR_DATA:-../shared/data} > $T/o.out 2>$T/o.err &
OP=$!
for i in $(seq 50); do grep -q listening $T/o.out 2>/dev/null && break; sleep 0.1; done
URL=$(head -1 $T/o.out | awk '{print $NF}')
export DCNR_CA=$T/tls/ca.pem
$B/pnode --orchestrator $URL --listen 10.214.0.1:0 --ephemeral --name direct 2>/dev/null &
P1=$!
EXTRA=""; [ $MODE = relayed ] && EXTRA=--behind-nat
ip netns exec $NS $B/pnode --orchestrator $URL --listen 10.214.0.2:0 --ephemeral --name inside $EXTRA 2>/dev/null &
P2=$!
for i in $(seq 100); do n=$($B/orchestrator pnodes --json --orchestrator $URL 2>/dev/null | grep -o '"health":"healthy"' | wc -l); [ "$n" = 2 ] && break; sleep 0.1; done
$B/orchestrator pnodes --orchestrator $URL 2>/dev/null | grep -i relay | head -2
$B/orchestrator submit models/mnist-mlp.toml --orchestrator $URL --steps $STEPS --wait --json 2>/dev/null | tail -1 | python3 -c "import json,sys; s=json.load(sys.stdin); print('$MODE', s['status'], round(s['samples_per_s']), s['params_sha256'][:12], sorted(set(v['pnode'] for v in s['vnodes'])).__len__())"
kill $P1 $P2 $OP 2>/dev/null; wait 2>/dev/null
ip netns del $NS; rm -rf $T
