"""The supervisor of r2d2_ray.py: starts the roles as Ray actors, watches them, finds the ones Ray
restarted or rebuilt, and stops them all.

- Roles: the param store (ray_param_store.py), the replay shards (ray_replay.py), and the roles
  the script hands in, its actor and evaluator classes (constructed as
  ``Actor(actor_id, shard_name, store_name, *actor_arguments)`` and
  ``Evaluator(*evaluator_arguments)``). ``--role-nodes`` places them (``role_nodes``); each one's
  node is printed at start. The code of the script's roles and of the plumbing they use goes to
  Ray's workers by value (cloudpickle): a cluster's nodes need only an r2d2_algo installed, as
  before the plumbing left the script, not the same one.
- An actor that dies is restarted by Ray (--max-actor-restarts, Ray's max_restarts): its acting
  loop ends with an error, the supervisor pings it until Ray has restarted it, then starts the
  loop again (``check``).
- The param store, the shards and the evaluator are rebuilt by Ray wherever it can when their
  node is lost (``REBUILT``), and Ray replays the calls they had not answered. Each says where it
  is, (node IP, incarnation) (ray_start.incarnation), beside any long call; an answer from a new
  incarnation means Ray rebuilt the role (``moved``). ``check`` asks each role every second and
  names on stderr one that has not answered for SILENT_AFTER_S seconds; ``settle`` waits for
  every answer at the end of a run. The learner gives a rebuilt role its state back.
- Every loss (an actor's death, a role lost with its node) counts against --max-actor-restarts;
  one more raises StopRun (the run stops with a final checkpoint).
"""

from __future__ import annotations

import sys
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from r2d2_algo import ray_param_store, ray_replay, ray_start
from r2d2_algo.limits import size
from r2d2_algo.ray_param_store import ParamStore
from r2d2_algo.ray_replay import ReplayShard, shard_of, shard_quotas
from r2d2_algo.stopping import StopRequest, StopRun

# Ray rebuilds these roles wherever it can when they are lost (with their node) and replays the
# calls they had not answered; `node` answers beside a long call (an evaluation, a checkpoint's copy).
# They need no CPU, but ask for 1 MiB of memory: Ray places a request for no resource at all on a
# random node, whatever its scheduling strategy (--role-nodes would be ignored); with one it packs
# them on the driver's node unless told otherwise.
REBUILT = dict(num_cpus=0, memory=2**20, max_restarts=-1, max_task_retries=-1, concurrency_groups={"where": 1})
SILENT_AFTER_S = 5.0  # a role that has not answered where it is for this long is named as unreachable
SETTLE_S = 60.0  # at the end of a run, the longest wait for the roles to say where they are


def role_nodes(args) -> dict[str, str]:
    """--role-nodes as {role: node IP}; ValueError (one line) for a malformed pair or an unknown role."""
    roles = {"param-store", "evaluator", *(f"replay-shard-{i}" for i in range(args.num_replay_shards)),
             *(f"actor-{i}" for i in range(args.num_actors))}
    placed = {}
    for pair in filter(None, (args.role_nodes or "").split(",")):
        role, _, node = pair.strip().partition("=")
        if role not in roles or not node:
            raise ValueError(f"--role-nodes: {pair.strip()!r} is not ROLE=NODE_IP with ROLE one of param-store, "
                             f"evaluator, replay-shard-0..{args.num_replay_shards - 1}, "
                             f"actor-0..{args.num_actors - 1}")
        placed[role] = node
    return placed


class Supervisor:
    """The Ray actors of a run (module docstring). ``restarts`` counts the losses.

    Args:
        args: the run's arguments (counts, --role-nodes, --max-actor-restarts, --seed, --total-timesteps).
        run_name: names the param store and the shards, which the actors look up by name.
        replay_arguments: each shard's SequenceReplayBuffer arguments (ray_replay.shard_arguments).
        actor, evaluator: the script's role classes (``evaluator`` None: no evaluations).
    Raises:
        SystemExit: one line, for a --role-nodes node the cluster does not have.
    """

    def __init__(self, args, run_name: str, replay_arguments: list[dict], actor: type, actor_arguments: tuple,
                 evaluator: type | None, evaluator_arguments: tuple):
        self.args = args
        # the roles' plumbing goes to Ray's workers by value, as the script's own classes do: a cluster's
        # nodes need an r2d2_algo installed (storage.py, model.py, ...) but not these modules of it
        for module in (ray_param_store, ray_replay, ray_start):
            ray.cloudpickle.register_pickle_by_value(module)
        nodes = {node["NodeManagerAddress"]: node["NodeID"] for node in ray.nodes() if node["Alive"]}
        placed = role_nodes(args)
        for role, ip in placed.items():
            if ip not in nodes:
                raise SystemExit(f"r2d2_ray.py: error: --role-nodes: no live node {ip} in the cluster for {role} "
                                 f"(its nodes: {', '.join(sorted(nodes))})")

        def where(role: str) -> dict:  # soft: a role whose node is lost may be rebuilt elsewhere
            if role not in placed:
                return {}
            return {"scheduling_strategy": NodeAffinitySchedulingStrategy(nodes[placed[role]], soft=True)}

        store_name = f"{run_name}/param-store"
        shard_names = [f"{run_name}/shard-{i}" for i in range(args.num_replay_shards)]
        self.store = ray.remote(**REBUILT)(ParamStore).options(name=store_name, **where("param-store")).remote(
            args.num_replay_shards)
        self.shards = [ray.remote(**REBUILT)(ReplayShard).options(name=name, **where(f"replay-shard-{i}")).remote(
            replay_arguments[i], args.seed + i, quota) for i, (name, quota) in enumerate(zip(shard_names, shard_quotas(args)))]
        actor_class = ray.remote(num_cpus=1, max_restarts=args.max_actor_restarts)(actor)
        self.actors = [actor_class.options(**where(f"actor-{i}")).remote(
            i, shard_names[shard_of(i, args)[0]], store_name, *actor_arguments) for i in range(args.num_actors)]
        self.evaluator = ray.remote(**REBUILT)(evaluator).options(**where("evaluator")).remote(
            *evaluator_arguments) if evaluator is not None else None
        self.runs, self.pings = {}, {}  # object ref -> actor index: acting loops, pings of restarting actors
        self.restarts, self.supervised = 0, 0.0
        # the roles Ray rebuilds: where each is (node, incarnation), and the question out to it
        self.rebuilt = {"the param store": self.store, **{f"replay shard {i}": s for i, s in enumerate(self.shards)},
                        **({"the evaluator": self.evaluator} if self.evaluator is not None else {})}
        self.where: dict[str, tuple[str, str]] = {}
        self.asking: dict[str, tuple] = {}  # role -> (ref, asked at, named as unreachable)
        self.watched = 0.0

    def describe(self) -> None:
        """Print the node of every role but the actors (``start_actors`` prints theirs)."""
        for role, handle in self.rebuilt.items():
            answer = ray.get(handle.node.remote(), timeout=600)
            self.where[role] = answer[:2]
            memory = f": {size(answer[2])}" if role.startswith("replay shard") else ""
            print(f"{role.removeprefix('the ')} on node {answer[0]}{memory}", flush=True)

    def start_actors(self) -> None:
        """Start every actor's acting loop (after the first params are published)."""
        nodes = ray.get([a.node.remote() for a in self.actors], timeout=600)  # they have built their envs
        for i, (node, _) in enumerate(nodes):
            print(f"actor {i} on node {node}", flush=True)
        for i, actor in enumerate(self.actors):  # an actor answers no other call after this one
            self.runs[actor.run.remote()] = i

    def check(self, global_step: int, writer) -> list[tuple[str, str, str]]:
        """Restart the acting loops of actors Ray restarted (``supervise``); returns the roles Ray
        rebuilt since the last call (``watch``)."""
        self.supervise(global_step, writer)
        return self.watch()

    def moved(self, role: str, where: tuple[str, str]) -> tuple[str, str, str] | None:
        """(role, old node, new node) if ``where`` (node, incarnation) is a new incarnation of
        ``role`` (Ray rebuilt it after its node was lost), which is recorded; else None."""
        if where[1] == self.where[role][1]:
            return None
        old_node, self.where[role] = self.where[role][0], tuple(where)
        return role, old_node, where[0]

    def watch(self) -> list[tuple[str, str, str]]:
        """Every second, ask each role Ray rebuilds where it is. Returns (role, old node, new node)
        for each one that Ray has rebuilt since (its node was lost); names on stderr, once, a role
        that has not answered for SILENT_AFTER_S seconds (its node is probably gone: Ray rebuilds
        the role once it has declared the node dead). Raises StopRun if Ray gave a role up."""
        rebuilt = []
        for role, (ref, asked, named) in list(self.asking.items()):
            if ray.wait([ref], timeout=0)[0]:
                del self.asking[role]
                try:
                    where = ray.get(ref)[:2]
                except ray.exceptions.RayError as e:
                    raise StopRun(f"{role} is lost for good: {str(e).strip().splitlines()[0][:200]}",
                                  checkpoint=True) from None
                moved = self.moved(role, where)
                if moved:
                    rebuilt.append(moved)
                elif named:
                    print(f"r2d2_ray.py: {role} (node {where[0]}) answers again", file=sys.stderr, flush=True)
            elif not named and time.time() - asked > SILENT_AFTER_S:
                print(f"r2d2_ray.py: {role} (node {self.where[role][0]}) has not answered for {SILENT_AFTER_S:.0f} s: "
                      f"its node may be lost; Ray rebuilds it elsewhere once it declares the node dead",
                      file=sys.stderr, flush=True)
                self.asking[role] = (ref, asked, True)
        if time.time() - self.watched >= 1.0:
            self.watched = time.time()
            for role, handle in self.rebuilt.items():
                if role not in self.asking:
                    self.asking[role] = (handle.node.remote(), time.time(), False)
        return rebuilt

    def settle(self, stop: StopRequest) -> list[tuple[str, str, str]]:
        """The last ``watch`` of a run: waits (up to SETTLE_S seconds, stops seen) until every role Ray
        rebuilds has answered where it is, so that a role lost in the run's last seconds (its node is
        declared dead seconds after it goes) is reported and counted, not missed at the exit."""
        for role, handle in self.rebuilt.items():
            if role not in self.asking:
                self.asking[role] = (handle.node.remote(), time.time(), False)
        refs, deadline = [ref for ref, _, _ in self.asking.values()], time.time() + SETTLE_S
        while ray.wait(refs, num_returns=len(refs), timeout=1.0)[1]:
            stop.check()
            if time.time() > deadline:
                late = [role for role, (ref, _, _) in self.asking.items() if not ray.wait([ref], timeout=0)[0]]
                print(f"r2d2_ray.py: {', '.join(late)} had not answered where {'it is' if len(late) == 1 else 'they are'} "
                      f"{SETTLE_S:.0f} s after the run's last step; not waiting longer", file=sys.stderr, flush=True)
                break
        self.watched = time.time()  # no new question
        return self.watch()

    def count_loss(self, what: str, global_step: int, writer) -> None:
        """One more loss (an actor, or a role on a lost node), against --max-actor-restarts:
        beyond it, StopRun (the run stops with a final checkpoint when checkpoints are on)."""
        if self.restarts >= self.args.max_actor_restarts:
            raise StopRun(f"{what} ({self.restarts} of --max-actor-restarts {self.args.max_actor_restarts} "
                          f"restarts used)", checkpoint=True)
        self.restarts += 1
        writer.add_text("actor_restarts", f"step {global_step}: {what}", global_step)

    def supervise(self, global_step: int, writer) -> None:
        """An actor whose acting loop ended has died: Ray restarts it (up to --max-actor-restarts).
        Until the restarted actor answers a ping it gets no other call (a call Ray fails fast while
        the Ray actor restarts is not a second death); then its loop is started again. Beyond
        --max-actor-restarts, or once Ray reports the actor dead for good, raises StopRun. Looks
        at most 10 times a second."""
        if time.time() - self.supervised < 0.1:
            return
        self.supervised = time.time()
        done, _ = ray.wait([*self.runs, *self.pings], num_returns=len(self.runs) + len(self.pings), timeout=0)
        for ref in done:
            if ref in self.pings:  # an actor Ray is restarting
                i = self.pings.pop(ref)
                try:
                    node, _ = ray.get(ref)
                except ray.exceptions.ActorUnavailableError:  # still restarting: ping again
                    self.pings[self.actors[i].node.remote()] = i
                except ray.exceptions.RayError as e:
                    raise StopRun(f"actor {i} could not be restarted: {str(e).strip().splitlines()[0][:200]}",
                                  checkpoint=True) from None
                else:
                    print(f"r2d2_ray.py: actor {i} restarted on node {node}", file=sys.stderr, flush=True)
                    self.runs[self.actors[i].run.remote()] = i
                continue
            i = self.runs.pop(ref)
            try:
                ray.get(ref)
                reason = "its loop returned"
            except ray.exceptions.RayActorError as e:
                reason = str(e).strip().splitlines()[0][:200]
            except ray.exceptions.RayError as e:
                reason = str(e).strip().splitlines()[-1][:200]
            if self.restarts >= self.args.max_actor_restarts:
                raise StopRun(f"actor {i} died ({self.restarts} of --max-actor-restarts "
                              f"{self.args.max_actor_restarts} restarts used): {reason}", checkpoint=True)
            self.restarts += 1
            print(f"r2d2_ray.py: actor {i} died at step {global_step:,}; restart {self.restarts} of "
                  f"{self.args.max_actor_restarts}: {reason}", file=sys.stderr, flush=True)
            writer.add_text("actor_restarts", f"step {global_step}: actor {i} died: {reason}", global_step)
            self.pings[self.actors[i].node.remote()] = i

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        """Kill every role (none is restarted); at the end of a ``with`` block, however it ends."""
        for handle in [*self.actors, *self.shards, self.store, *([self.evaluator] if self.evaluator else [])]:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # already gone
                pass
