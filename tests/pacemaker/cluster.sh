#!/bin/bash
# A real two-node Corosync + Pacemaker cluster on this host, for blockd's
# integration test (tests/tests/pacemaker.rs). Each node is a set of namespaces
# (network, mount, UTS, IPC, PID) running its own corosync, pacemakerd and blockd
# on its own backing file; the nodes talk over one veth pair (10.214.0.1/.2).
# Adapted from a verified lab recipe; see tests/pacemaker/README.md.
#
# usage: cluster.sh check | up | down [--hard] | state NODE | exec NODE CMD...
#        cluster.sh start-node|stop-node|kill-node NODE | partition | heal
#        cluster.sh configure          (the clone; done by "up")
#        cluster.sh blockctl NODE ARGS (blockctl inside NODE, its config and node name)
#        cluster.sh logs               (tails of every node log, for failure reports)
#
# Environment:
#   BDPCMK_DIR    (required) host dir holding everything: nodes/<node>/…, state/, r0.toml
#   BDPCMK_BIN    (required for up) dir holding the blockd and blockctl binaries
#   BDPCMK_OCF    dir holding the agent `blockd` (and `crm-fence-peer`), i.e. the repo's ocf/
#   BDPCMK_AGENT  class:provider:type of the promotable clone (ocf:blockd:blockd)
#   BDPCMK_TOKEN  corosync token in ms (1000)
#   BDPCMK_NODE_EXTRA  raw TOML lines appended to each [[node]] table of r0.toml
#   BDPCMK_DISK_BYTES  size of each backing file (64 MiB)
#   BDPCMK_FENCING  1 = real fencing (stonith-enabled, stonith-action=off): the
#       stonith agent fence_bdpcmk (overlaid on each node's /usr/sbin) asks the
#       host-side daemon `cluster.sh _fenced` to SIGKILL the victim's namespace;
#       requests are served one at a time and refused when the requester was
#       itself fenced meanwhile, so in a split exactly one node survives.
set -euo pipefail

DIR=${BDPCMK_DIR:?BDPCMK_DIR must name the test directory}
BIN=${BDPCMK_BIN:-}
OCF_SRC=${BDPCMK_OCF:-}
AGENT=${BDPCMK_AGENT:-ocf:blockd:blockd}
TOKEN=${BDPCMK_TOKEN:-1000}
NODE_EXTRA=${BDPCMK_NODE_EXTRA:-}
DISK_BYTES=${BDPCMK_DISK_BYTES:-67108864}
FENCING=${BDPCMK_FENCING:-0}
DC_DEADTIME=2s          # pacemaker's default (20 s) would dominate the first start
SUBNET=10.214.0         # distinct from link_cut.rs (10.251.0.x) and the lab (10.213.0.x)
NODES=(node1 node2)
NS_PREFIX=bdpcmk-       # netns names bdpcmk-node1, bdpcmk-node2; veth bdpcmk-n1/-n2
STATE=$DIR/state        # host-side pid files
CONFIG=$DIR/r0.toml     # blockd config, one file for both nodes
FENCE=$DIR/fence        # fence request/ack spool (host dir, visible in the nodes)
FENCED_LIFETIME=900     # the fence daemon exits by itself after this many seconds
SELF=$(readlink -f "$0")
RSC=blockd              # primitive id
CLONE=blockd-clone      # promotable clone id
# Every loop below is bounded by a deadline (seconds).
STOP_DEADLINE=60

log() { printf '%(%H:%M:%S)T cluster.sh: %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
node_idx() { case $1 in node1) echo 1;; node2) echo 2;; *) die "unknown node $1";; esac; }
node_addr() { echo "$SUBNET.$(node_idx "$1")"; }
veth() { echo "bdpcmk-n$(node_idx "$1")"; }
ndir() { echo "$DIR/nodes/$1"; }
deadline() { echo $(( $(date +%s) + $1 )); }
past() { [ "$(date +%s)" -ge "$1" ]; }

# ---------------------------------------------------------------- tools
cmd_check() {
    local missing=() t
    for t in corosync corosync-keygen corosync-cfgtool pacemakerd crm_mon crm_attribute cibadmin crm nsenter unshare ip python3; do
        command -v "$t" >/dev/null || missing+=("$t")
    done
    [ -x /usr/lib/ocf/resource.d/pacemaker/Stateful ] || missing+=(ocf:pacemaker:Stateful)
    [ -e /usr/lib/ocf/lib/heartbeat/ocf-shellfuncs ] || missing+=(ocf-shellfuncs)
    if ((${#missing[@]})); then
        die "missing ${missing[*]}: apt-get install -y --no-install-recommends pacemaker corosync pacemaker-cli-utils resource-agents crmsh iproute2 util-linux"
    fi
    id hacluster >/dev/null 2>&1 || die "no hacluster user (from the pacemaker package)"
}

# ---------------------------------------------------------------- namespace plumbing
init_pid() {   # host PID of the node's namespace init (PID 1 inside)
    local f=$STATE/$1.init.pid p
    [ -s "$f" ] || return 1
    p=$(cat "$f")
    [ "$(cat /proc/"$p"/comm 2>/dev/null)" = cluster.sh ] || return 1   # guards against PID reuse
    echo "$p"
}
node_running() { init_pid "$1" >/dev/null 2>&1; }

reap_unshare() {  # the host-side unshare parent exits once its child (ns init) is gone
    local n=$1 u end
    [ -s "$STATE/$n.unshare.pid" ] || return 0
    u=$(cat "$STATE/$n.unshare.pid")
    end=$(deadline 3)
    while [ "$(cat /proc/"$u"/comm 2>/dev/null)" = unshare ] && ! past "$end"; do sleep 0.05; done
    if [ "$(cat /proc/"$u"/comm 2>/dev/null)" = unshare ]; then kill -KILL "$u" 2>/dev/null || true; fi
    rm -f "$STATE/$n.unshare.pid" "$STATE/$n.init.pid"
}

nsx() {        # run a command inside all namespaces of a node
    local n=$1 p; shift
    p=$(init_pid "$n") || die "$n is not running"
    nsenter -t "$p" -m -u -i -n -p -- "$@"
}

net_up() {
    local n
    for n in "${NODES[@]}"; do
        ip netns add "$NS_PREFIX$n"
        ip -n "$NS_PREFIX$n" link set lo up
    done
    ip link add "$(veth node1)" netns "${NS_PREFIX}node1" type veth peer name "$(veth node2)" netns "${NS_PREFIX}node2"
    for n in "${NODES[@]}"; do
        ip -n "$NS_PREFIX$n" addr add "$(node_addr "$n")/24" dev "$(veth "$n")"
        ip -n "$NS_PREFIX$n" link set "$(veth "$n")" up
    done
}

net_down() {   # kills what is left in OUR namespaces (only this harness uses the bdpcmk- names)
    local n p
    for n in "${NODES[@]}"; do
        [ -e "/run/netns/$NS_PREFIX$n" ] || continue
        for p in $(ip netns pids "$NS_PREFIX$n" 2>/dev/null); do
            log "killing leftover pid $p ($(cat /proc/"$p"/comm 2>/dev/null)) in $NS_PREFIX$n"
            kill -KILL "$p" 2>/dev/null || true
        done
        ip netns delete "$NS_PREFIX$n" || log "warning: ip netns delete $NS_PREFIX$n failed"
    done
    return 0
}

# ---------------------------------------------------------------- configuration
write_blockd_config() {
    local n
    {
        # The nodes talk over a veth, not loopback: peers must authenticate.
        printf '[resource]\nname = "r0"\nprotocol = "C"\nshared-secret = "pacemaker test cluster secret"\n'
        for n in "${NODES[@]}"; do
            # NBD on a Unix socket in the node's host dir (a path: reachable from
            # the test process too); control socket in the node's private /run.
            printf '\n[[node]]\nname = "%s"\nreplication = "%s:7789"\nnbd = "unix:%s/nbd.sock"\n' \
                "$n" "$(node_addr "$n")" "$(ndir "$n")"
            printf 'disk = "%s/disk.img"\nmeta = "internal"\ncontrol = "/run/blockd/r0-%s.sock"\n' "$(ndir "$n")" "$n"
            [ -n "$NODE_EXTRA" ] && printf '%s\n' "$NODE_EXTRA"
        done
    } > "$CONFIG"
    for n in "${NODES[@]}"; do
        truncate -s "$DISK_BYTES" "$(ndir "$n")/disk.img"
        # Identical (empty) disks: no initial full sync.
        "$BIN/blockctl" --config "$CONFIG" --node "$n" create-md --clear-bitmap >/dev/null
    done
}

write_config() {
    mkdir -p "$STATE" "$DIR/nodes"
    local n d
    corosync-keygen -l -k "$DIR/nodes/authkey" >/dev/null
    chmod 400 "$DIR/nodes/authkey"
    { echo "127.0.0.1 localhost"; for n in "${NODES[@]}"; do echo "$(node_addr "$n") $n"; done; } > "$DIR/nodes/hosts"
    mkdir -p "$DIR/bin"
    ln -sf "$BIN/blockd" "$DIR/bin/blockd"
    ln -sf "$BIN/blockctl" "$DIR/bin/blockctl"
    if [ -n "$OCF_SRC" ] && [ -e "$OCF_SRC/crm-fence-peer" ]; then
        install -m 755 "$OCF_SRC/crm-fence-peer" "$DIR/bin/crm-fence-peer"
        install -m 755 "$OCF_SRC/crm-unfence-peer" "$DIR/bin/crm-unfence-peer"
    fi
    [ "$FENCING" = 1 ] && write_fence_agent
    for n in "${NODES[@]}"; do
        d=$(ndir "$n")
        mkdir -p "$d"/{etc-corosync,var-lib-corosync,var-log/pacemaker,var-log/corosync,var-log/cluster,var-log/crmsh,var-log/blockd}
        mkdir -p "$d"/var-lib-pacemaker/{cib,pengine,blackbox,cores}
        chown -R hacluster:haclient "$d"/var-lib-pacemaker "$d"/var-log/pacemaker
        chmod 750 "$d"/var-lib-pacemaker/*; chmod 770 "$d"/var-log/pacemaker
        # The node's view of /usr/lib/ocf/resource.d: the host's providers plus
        # blockd/ with this tree's agent (bound in by the node's init).
        mkdir -p "$d/ocf-resource.d/blockd"
        if [ -n "$OCF_SRC" ] && [ -e "$OCF_SRC/blockd" ]; then
            install -m 755 "$OCF_SRC/blockd" "$d/ocf-resource.d/blockd/blockd"
        fi
        cat > "$d/etc-corosync/corosync.conf" <<CONF
# generated by cluster.sh for $n
totem {
  version: 2
  cluster_name: bdpcmk
  transport: knet
  token: $TOKEN
  crypto_cipher: aes256
  crypto_hash: sha256
}
nodelist {
  node {
    ring0_addr: $(node_addr node1)
    name: node1
    nodeid: 1
  }
  node {
    ring0_addr: $(node_addr node2)
    name: node2
    nodeid: 2
  }
}
quorum {
  provider: corosync_votequorum
  two_node: 1
}
logging {
  to_logfile: yes
  logfile: /var/log/cluster/corosync.log
  to_syslog: no
  to_stderr: no
  timestamp: hires
}
CONF
        install -m 400 "$DIR/nodes/authkey" "$d/etc-corosync/authkey"
        # Initial CIB with a short dc-deadtime; no cib.xml.sig (pacemaker only warns).
        cat > "$d/var-lib-pacemaker/cib/cib.xml" <<CIB
<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="cib-bootstrap-options-dc-deadtime" name="dc-deadtime" value="$DC_DEADTIME"/>
      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources/>
    <constraints/>
  </configuration>
  <status/>
</cib>
CIB
        chown hacluster:haclient "$d/var-lib-pacemaker/cib/cib.xml"
        chmod 600 "$d/var-lib-pacemaker/cib/cib.xml"
    done
    write_blockd_config
}

# ---------------------------------------------------------------- fencing (optional)
write_fence_agent() {
    mkdir -p "$FENCE" "$DIR/sbin-extra"
    local a=$DIR/sbin-extra/fence_bdpcmk
    printf '#!/bin/bash\n# fence_bdpcmk - generated by cluster.sh; runs inside a node.\nFENCE=%s\nSTATE=%s\n' "$FENCE" "$STATE" > "$a"
    cat >> "$a" <<'AGENT'
action=reboot; port=
while [ $# -gt 0 ]; do
    case $1 in
        -o|--action) action=$2; shift ;; --action=*) action=${1#*=} ;;
        -n|--plug) port=$2; shift ;; --plug=*) port=${1#*=} ;;
    esac; shift
done
if [ ! -t 0 ]; then
    while IFS='=' read -r k v; do
        case $k in action|option) action=$v ;; port|plug) port=$v ;; nodename) [ -z "$port" ] && port=$v ;; esac
    done
fi
case $action in
metadata)
    cat <<'XML'
<?xml version="1.0" ?>
<resource-agent name="fence_bdpcmk" shortdesc="Fences a bdpcmk test node (SIGKILL of its namespaces)">
<longdesc>Asks the host-side daemon of tests/pacemaker/cluster.sh to kill the node's PID namespace.</longdesc>
<parameters>
  <parameter name="action" unique="0" required="1">
    <getopt mixed="-o, --action=[action]"/><content type="string" default="reboot"/>
    <shortdesc lang="en">Fencing action</shortdesc>
  </parameter>
  <parameter name="port" unique="0" required="0">
    <getopt mixed="-n, --plug=[id]"/><content type="string"/>
    <shortdesc lang="en">Node to fence</shortdesc>
  </parameter>
</parameters>
<actions>
  <action name="off"/><action name="reboot"/><action name="status"/><action name="list"/>
  <action name="monitor"/><action name="metadata"/><action name="validate-all"/>
</actions>
</resource-agent>
XML
    exit 0 ;;
monitor|validate-all)
    [ -e "$FENCE/alive" ] && [ $(( $(date +%s) - $(stat -c %Y "$FENCE/alive") )) -lt 5 ] && exit 0
    exit 1 ;;
list) echo node1; echo node2; exit 0 ;;
status) [ -s "$STATE/$port.init.pid" ] && exit 0 || exit 2 ;;
off|reboot)
    id=$(date +%s%N)-$$
    echo "$(hostname) $port $action" > "$FENCE/req.$id.tmp" && mv "$FENCE/req.$id.tmp" "$FENCE/req.$id"
    for i in $(seq 200); do
        if [ -e "$FENCE/ack.$id" ]; then
            r=$(cat "$FENCE/ack.$id"); rm -f "$FENCE/ack.$id"
            [ "$r" = ok ] && exit 0 || exit 1
        fi
        sleep 0.1
    done
    exit 1 ;;
*) exit 1 ;;
esac
AGENT
    chmod 755 "$a"
}

cmd__fenced() {   # host side; one request at a time; bounded lifetime
    local r id requester target action res end
    end=$(deadline "$FENCED_LIFETIME")
    while [ -d "$FENCE" ] && ! past "$end"; do
        touch "$FENCE/alive"
        for r in "$FENCE"/req.*; do
            [ -e "$r" ] || continue
            case $r in *.tmp) continue ;; esac
            id=${r##*/req.}
            read -r requester target action < "$r" || true
            if [ -n "$requester" ] && ! node_running "$requester"; then
                res=fail   # the requester was fenced meanwhile (the other side won the race)
            else
                node_running "$target" && kill_node "$target"
                res=ok
            fi
            echo "$res" > "$FENCE/ack.$id.tmp"; mv "$FENCE/ack.$id.tmp" "$FENCE/ack.$id"
            rm -f "$r"
            log "fence request from $requester: $action $target -> $res"
            echo "$requester $target $res" >> "$FENCE/history"
        done
        sleep 0.1
    done
}

start_fenced() {
    setsid "$SELF" _fenced >>"$FENCE/fenced.log" 2>&1 </dev/null &
    echo $! > "$STATE/fenced.pid"
    log "fence daemon started (pid $!)"
}

stop_fenced() {
    local f
    [ -s "$STATE/fenced.pid" ] || return 0
    f=$(cat "$STATE/fenced.pid")
    if grep -q _fenced "/proc/$f/cmdline" 2>/dev/null; then kill -TERM "$f" 2>/dev/null || true; fi
    rm -f "$STATE/fenced.pid"
}

# ---------------------------------------------------------------- inside the node (PID 1)
cmd__init() {
    local n=$1 d p cpid ppid end
    d=$(ndir "$n")
    # Private mounts (the mount namespace has private propagation: the host sees none).
    mount -t tmpfs -o mode=755 bdpcmk-run /run
    mkdir -p /run/lock /run/resource-agents /run/crm /run/blockd
    mount -t tmpfs -o mode=1777 bdpcmk-shm /dev/shm
    mount --bind "$d/etc-corosync" /etc/corosync
    mount --bind "$d/var-lib-pacemaker" /var/lib/pacemaker
    mount --bind "$d/var-lib-corosync" /var/lib/corosync
    mount --bind "$d/var-log" /var/log
    mount --bind "$DIR/nodes/hosts" /etc/hosts
    # OCF providers: the host's, plus this tree's blockd agent.
    for p in /usr/lib/ocf/resource.d/*/; do
        p=$(basename "$p")
        [ "$p" = blockd ] && continue
        mkdir -p "$d/ocf-resource.d/$p"
        mount --bind "/usr/lib/ocf/resource.d/$p" "$d/ocf-resource.d/$p"
    done
    mount --rbind "$d/ocf-resource.d" /usr/lib/ocf/resource.d
    # pacemaker-fenced finds RHCS-style agents in /usr/sbin only: add ours there,
    # in this node's view only (read-only overlay, nothing written to the host).
    if [ "$FENCING" = 1 ]; then
        mount -t overlay bdpcmk-sbin -o "lowerdir=$DIR/sbin-extra:/usr/sbin" /usr/sbin
    fi
    hostname "$n"
    echo "$n: init pid $$ (in ns)"

    export PATH="$DIR/bin:$PATH"
    export PCMK_logfile=/var/log/pacemaker/pacemaker.log PCMK_logfacility=none PCMK_debug=no

    corosync -f &
    cpid=$!
    end=$(deadline 10)
    until corosync-cfgtool -s >/dev/null 2>&1; do
        kill -0 $cpid 2>/dev/null || { echo "corosync died"; exit 1; }
        past "$end" && { echo "corosync did not answer in 10 s"; exit 1; }
        sleep 0.1
    done
    echo "$n: corosync up (pid $cpid)"
    pacemakerd &
    ppid=$!
    echo "$n: pacemakerd started (pid $ppid)"

    stop_stack() {
        echo "$n: graceful shutdown requested"
        local end
        end=$(deadline 50)
        if kill -0 "$ppid" 2>/dev/null; then
            kill -TERM "$ppid"
            while kill -0 "$ppid" 2>/dev/null && ! past "$end"; do sleep 0.2; done
        fi
        corosync-cfgtool -H --force >/dev/null 2>&1 || kill -TERM $cpid
        while kill -0 "$cpid" 2>/dev/null && ! past "$end"; do sleep 0.2; done
        echo "$n: stack stopped"
        exit 0   # PID 1 exits: the kernel kills whatever is left in the namespace
    }
    trap stop_stack TERM INT
    # As PID 1 we reap orphans: bash does while it waits.
    while :; do sleep 5 & wait $! || true; done
}

# ---------------------------------------------------------------- node lifecycle
start_node() {
    local n=$1 d up child='' end
    d=$(ndir "$n")
    node_running "$n" && { log "$n already running"; return 0; }
    rm -f "$STATE/$n.init.pid"
    # ip netns exec execs unshare (same PID); unshare forks PID 1 of the new pid ns.
    setsid ip netns exec "$NS_PREFIX$n" \
        unshare --mount --uts --ipc --pid --fork --mount-proc --propagation private \
        "$SELF" _init "$n" >>"$d/init.log" 2>&1 </dev/null &
    up=$!
    echo "$up" > "$STATE/$n.unshare.pid"
    end=$(deadline 5)
    while [ -z "$child" ]; do
        child=$(awk '{print $1}' /proc/$up/task/$up/children 2>/dev/null || true)
        [ -n "$child" ] && break
        past "$end" && die "could not find the init of $n"
        sleep 0.05
    done
    echo "$child" > "$STATE/$n.init.pid"
    log "$n started: unshare pid $up, init pid $child"
}

kill_node() {   # crash: SIGKILL to PID 1 of the namespace kills every process in it
    local n=$1 p end
    p=$(init_pid "$n") || { log "$n not running"; reap_unshare "$n"; return 0; }
    kill -KILL "$p"
    end=$(deadline 10)
    while [ -d "/proc/$p" ] && ! past "$end"; do sleep 0.05; done
    reap_unshare "$n"
    log "$n killed (init pid $p)"
}

stop_node() {   # graceful: pacemaker stops its resources, then corosync leaves
    local n=$1 p end
    p=$(init_pid "$n") || { log "$n not running"; reap_unshare "$n"; return 0; }
    kill -TERM "$p"
    end=$(deadline "$STOP_DEADLINE")
    while [ -d "/proc/$p" ] && ! past "$end"; do sleep 0.1; done
    if [ -d "/proc/$p" ]; then
        log "$n did not stop in $STOP_DEADLINE s, killing"
        kill -KILL "$p"
        end=$(deadline 10)
        while [ -d "/proc/$p" ] && ! past "$end"; do sleep 0.05; done
    fi
    reap_unshare "$n"
    log "$n stopped"
}

# ---------------------------------------------------------------- cluster
configure() {
    local n=node1 class provider type nn
    IFS=: read -r class provider type <<<"$AGENT"
    if [ "$FENCING" = 1 ]; then
        nsx "$n" crm_attribute -t crm_config -n stonith-action -v off
        nsx "$n" cibadmin -C -o resources -X "
<primitive id=\"fence-bdpcmk\" class=\"stonith\" type=\"fence_bdpcmk\">
  <instance_attributes id=\"fence-bdpcmk-ia\">
    <nvpair id=\"fence-bdpcmk-hosts\" name=\"pcmk_host_list\" value=\"node1 node2\"/>
    <nvpair id=\"fence-bdpcmk-check\" name=\"pcmk_host_check\" value=\"static-list\"/>
  </instance_attributes>
  <operations><op id=\"fence-bdpcmk-monitor\" name=\"monitor\" interval=\"30s\"/></operations>
</primitive>"
        nsx "$n" crm_attribute -t crm_config -n stonith-enabled -v true
    else
        nsx "$n" crm_attribute -t crm_config -n stonith-enabled -v false
    fi
    nsx "$n" crm_attribute -t crm_config -n no-quorum-policy -v ignore
    # Short: a transition left waiting on a lost status update (seen once: an
    # instance shown "Promoting" though promote and monitor had succeeded) is
    # re-checked within seconds instead of a minute.
    nsx "$n" crm_attribute -t crm_config -n cluster-recheck-interval -v 5s
    # Resources stay where they are when a failed node returns.
    nsx "$n" crm_attribute -t rsc_defaults -n resource-stickiness -v 1
    local params=""
    if [ "$AGENT" = ocf:blockd:blockd ]; then
        params="<instance_attributes id=\"$RSC-ia\">
      <nvpair id=\"$RSC-resource\" name=\"resource\" value=\"r0\"/>
      <nvpair id=\"$RSC-config\" name=\"config\" value=\"$CONFIG\"/>
      <nvpair id=\"$RSC-blockctl\" name=\"blockctl\" value=\"$DIR/bin/blockctl\"/>
    </instance_attributes>"
        # node=nodeN on each node (a rule on #uname; the agent's default is uname -n anyway)
        for nn in "${NODES[@]}"; do
            params="$params
    <instance_attributes id=\"$RSC-ia-$nn\" score=\"2\">
      <rule id=\"$RSC-ia-$nn-rule\" score=\"0\">
        <expression id=\"$RSC-ia-$nn-expr\" attribute=\"#uname\" operation=\"eq\" value=\"$nn\"/>
      </rule>
      <nvpair id=\"$RSC-node-$nn\" name=\"node\" value=\"$nn\"/>
    </instance_attributes>"
        done
    fi
    nsx "$n" cibadmin -C -o resources -X "
<clone id=\"$CLONE\">
  <meta_attributes id=\"$CLONE-meta\">
    <nvpair id=\"$CLONE-promotable\" name=\"promotable\" value=\"true\"/>
    <nvpair id=\"$CLONE-promoted-max\" name=\"promoted-max\" value=\"1\"/>
    <nvpair id=\"$CLONE-promoted-node-max\" name=\"promoted-node-max\" value=\"1\"/>
    <nvpair id=\"$CLONE-clone-max\" name=\"clone-max\" value=\"2\"/>
    <nvpair id=\"$CLONE-clone-node-max\" name=\"clone-node-max\" value=\"1\"/>
    <nvpair id=\"$CLONE-notify\" name=\"notify\" value=\"true\"/>
  </meta_attributes>
  <primitive id=\"$RSC\" class=\"$class\" provider=\"$provider\" type=\"$type\">
    $params
    <operations>
      <op id=\"$RSC-start\" name=\"start\" interval=\"0s\" timeout=\"60s\"/>
      <op id=\"$RSC-stop\" name=\"stop\" interval=\"0s\" timeout=\"60s\"/>
      <op id=\"$RSC-promote\" name=\"promote\" interval=\"0s\" timeout=\"60s\"/>
      <op id=\"$RSC-demote\" name=\"demote\" interval=\"0s\" timeout=\"60s\"/>
      <op id=\"$RSC-monitor-promoted\" name=\"monitor\" interval=\"3s\" role=\"Promoted\" timeout=\"20s\"/>
      <op id=\"$RSC-monitor-unpromoted\" name=\"monitor\" interval=\"4s\" role=\"Unpromoted\" timeout=\"20s\"/>
    </operations>
  </primitive>
</clone>"
}

# One JSON object: the cluster as NODE sees it (crm_mon XML, parsed).
cmd_state() {
    local n=$1 x
    node_running "$n" || { echo '{"running":false}'; return 0; }
    x=$(nsx "$n" crm_mon -1 --output-as=xml 2>/dev/null) || { echo '{"running":true,"answer":false}'; return 0; }
    python3 - "$x" "$RSC" <<'PY'
import json, sys, xml.etree.ElementTree as ET
r = ET.fromstring(sys.argv[1]); rsc = sys.argv[2]
dc = r.find('.//current_dc')
out = {"running": True, "answer": True,
       "dc": dc is not None and dc.get('present') == 'true',
       "promoted": [], "unpromoted": [], "other": [], "failed": []}
nodes = r.find('nodes')
out["online"] = sorted(n.get('name') for n in (nodes if nodes is not None else [])
                       if n.get('online') == 'true')
out["standby"] = sorted(n.get('name') for n in (nodes if nodes is not None else [])
                        if n.get('standby') == 'true')
for res in r.iter('resource'):
    if res.get('id') != rsc or res.get('active') != 'true':
        continue
    where = [nd.get('name') for nd in res.iter('node')]
    role = res.get('role')
    key = {'Promoted': 'promoted', 'Master': 'promoted',
           'Unpromoted': 'unpromoted', 'Slave': 'unpromoted'}.get(role, 'other')
    out[key] += where if key != 'other' else [f"{role}@{w}" for w in where]
for f in r.iter('failure'):
    out["failed"].append(dict(f.attrib))
print(json.dumps(out))
PY
}

cmd_up() {
    cmd_check
    [ -n "$BIN" ] || die "BDPCMK_BIN must name the dir holding blockd and blockctl"
    local n
    for n in "${NODES[@]}"; do node_running "$n" && die "$n already running; 'down' first"; done
    net_down   # namespaces of a run that died before its down
    rm -rf "$DIR/nodes" "$STATE"
    net_up
    write_config
    [ "$FENCING" = 1 ] && start_fenced
    for n in "${NODES[@]}"; do start_node "$n"; done
    return 0
}

cmd_down() {
    local n pids=()
    for n in "${NODES[@]}"; do   # both at once, each bounded
        if node_running "$n"; then
            if [ "${1:-}" = --hard ]; then kill_node "$n" & else stop_node "$n" & fi
            pids+=($!)
        fi
    done
    for n in "${pids[@]}"; do wait "$n" || true; done
    for n in "${NODES[@]}"; do reap_unshare "$n"; done
    stop_fenced
    net_down
    log "down: namespaces removed"
}

cmd_logs() {
    local n f
    for n in "${NODES[@]}"; do
        for f in "$(ndir "$n")/init.log" "$(ndir "$n")"/var-log/blockd/*.log "$(ndir "$n")/var-log/pacemaker/pacemaker.log"; do
            [ -f "$f" ] || continue
            echo "----- $f (last 40 lines)"
            tail -n 40 "$f"
        done
    done
}

case ${1:-} in
    check)      cmd_check ;;
    up)         cmd_up ;;
    configure)  configure ;;
    down)       shift; cmd_down "$@" ;;
    state)      cmd_state "$2" ;;
    exec)       shift; n=$1; shift; nsx "$n" "$@" ;;
    blockctl)   shift; n=$1; shift; nsx "$n" "$BIN/blockctl" --config "$CONFIG" --node "$n" "$@" ;;
    start-node) start_node "$2" ;;
    stop-node)  stop_node "$2" ;;
    kill-node)  kill_node "$2" ;;
    partition)  ip -n "${NS_PREFIX}node1" link set "$(veth node1)" down; log "link cut" ;;
    heal)       ip -n "${NS_PREFIX}node1" link set "$(veth node1)" up; log "link restored" ;;
    logs)       cmd_logs ;;
    _init)      cmd__init "$2" ;;
    _fenced)    cmd__fenced ;;
    *) sed -n '2,/^set -euo/p' "$SELF" | sed '$d'; exit 2 ;;
esac
