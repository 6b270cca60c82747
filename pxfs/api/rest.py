"""The openstorage volume and cluster routes of the REST API (port 9001), served by pxd-sidecar.

Besides openstorage's routes it serves Portworx's /statslive and /statshistory.

Every handler turns one request into control calls to pxd and converts the records it gets back
with pxfs.api.osd. The sidecar keeps no volume state of its own. Errors come in the two shapes
of openstorage: a hard error raises a PxfsError, which the error middleware of pxfs.api.app
sends as plain text with the error's HTTP status. A soft error, the way openstorage reports a
failed driver operation, is an HTTP 200 reply whose `volume_response.error` contains the message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from pxfs import errors
from pxfs.api import osd, osdrequests
from pxfs.api.control import ControlClient

log = logging.getLogger(__name__)

CONTROL: web.AppKey[ControlClient] = web.AppKey("control", ControlClient)

#: Errors that mean pxd could not be reached. They stay hard errors (HTTP 503) even where
#: openstorage reports failures as soft errors, so that clients can tell "retry later" from
#: "the operation failed".
_HARD_ERRORS = (errors.Unavailable,)

#: The only `stattype` of /statslive and /statshistory: statistics of one volume.
STAT_TYPE_VOLUME = "volstat"

routes = web.RouteTableDef()


@routes.get("/osd-volumes/versions")
async def list_versions(request: web.Request) -> web.Response:
    """Return the API versions that this server implements."""
    return web.json_response(["v1"])


@routes.post("/v1/osd-volumes")
async def create_volume(request: web.Request) -> web.Response:
    """Create a volume, or return the existing one of the same name, size and HA level."""
    create = osdrequests.parse_create_request(osdrequests.decode_body(await request.read()))
    control = _control(request)
    if create.nodes is not None:
        create.nodes = osd.node_ids_from_ips(await control.call("cluster.nodes"), create.nodes)
    try:
        record = await control.call("volume.create", create.to_rpc())
    except _HARD_ERRORS:
        raise
    except errors.PxfsError as exc:
        log.info("creating volume %s failed: %s", create.name, exc.message)
        return web.json_response({"volume_response": {"error": exc.message}})
    log.info("created volume %s (%s)", create.name, record["id"])
    return web.json_response({"id": str(record["id"]), "volume_response": {}})


@routes.get("/v1/osd-volumes")
async def list_volumes(request: web.Request) -> web.Response:
    """List the volumes, filtered by the Name, Label, ConfigLabel and VolumeID parameters."""
    query = request.query
    labels = osdrequests.parse_label_query(query.getall("Label", []), "Label")
    labels.update(osdrequests.parse_label_query(query.getall("ConfigLabel", []), "ConfigLabel"))
    filters: dict[str, Any] = {}
    if query.get("Name"):
        filters["name"] = query["Name"]
    if labels:
        filters["labels"] = labels
    if query.getall("VolumeID", []):
        filters["ids"] = list(query.getall("VolumeID"))

    control = _control(request)
    records = await control.call("volume.list", filters)
    node_id = await _node_id(control) if records else ""
    return web.json_response([osd.volume_to_osd(record, node_id) for record in records])


@routes.get("/v1/osd-volumes/{id}")
async def inspect_volume(request: web.Request) -> web.Response:
    """Return a list with the volume whose name or id is `id`, or an empty list."""
    control = _control(request)
    volume = await _inspect(control, request.match_info["id"])
    return web.json_response([volume] if volume else [])


@routes.put("/v1/osd-volumes/{id}")
async def set_volume(request: web.Request) -> web.Response:
    """Apply a VolumeSetRequest: size, HA level and labels, then attach or detach, then mount."""
    update = osdrequests.parse_set_request(osdrequests.decode_body(await request.read()))
    control = _control(request)
    ref = request.match_info["id"]

    if update.updates_volume:
        await _update_volume(control, ref, update)
    error = await _apply_attach(control, ref, update)
    if not error:
        error = await _apply_mount(control, ref, update)

    volume = await _inspect(control, ref)
    if error and volume is None and _is_release(update):
        # Detaching or unmounting a volume that does not exist is a success in openstorage.
        error = ""
    response = {"error": error} if error else {}
    return web.json_response({"volume": volume or {}, "volume_response": response})


@routes.delete("/v1/osd-volumes/{id}")
async def delete_volume(request: web.Request) -> web.Response:
    """Delete a volume; deleting a volume that does not exist succeeds."""
    ref = request.match_info["id"]
    try:
        await _control(request).call("volume.delete", ref)
    except errors.NotFound:
        return web.json_response({})
    except _HARD_ERRORS:
        raise
    except errors.PxfsError as exc:
        log.info("deleting volume %s failed: %s", ref, exc.message)
        return web.json_response({"error": exc.message})
    log.info("deleted volume %s", ref)
    return web.json_response({})


@routes.get("/v1/osd-volumes/stats/{id}")
async def volume_stats(request: web.Request) -> web.Response:
    """Return a volume's Stats: totals since creation, or with Cumulative=false the last 2 s."""
    cumulative = _bool_query(request, "Cumulative", default=True)
    stats = await _control(request).call("volume.stats", request.match_info["id"], cumulative)
    return web.json_response(osd.stats_to_osd(stats))


@routes.get("/v1/osd-volumes/usedsize/{id}")
async def volume_used_size(request: web.Request) -> web.Response:
    """Return the bytes that the volume's replica stores, as a bare JSON integer."""
    record = await _control(request).call("volume.inspect", request.match_info["id"])
    return web.json_response(int(record.get("usage") or 0))


@routes.get("/v1/osd-volumes/usage/{id}")
async def volume_usage(request: web.Request) -> web.Response:
    """Return the CapacityUsageInfo of a volume: all of its stored bytes are exclusive."""
    record = await _control(request).call("volume.inspect", request.match_info["id"])
    return web.json_response(osd.usage_to_osd(record))


@routes.post("/v1/osd-volumes/bytesused")
async def volumes_bytes_used(request: web.Request) -> web.Response:
    """Return the stored bytes of the volumes in `ids`, or of every volume when it is empty."""
    requested_node, ids = osdrequests.parse_bytes_used_request(
        osdrequests.decode_body(await request.read())
    )
    control = _control(request)
    node_id = await _node_id(control)
    if requested_node and requested_node != node_id:
        raise errors.InvalidArgument(
            f"node_id {requested_node} is not this node ({node_id}); send the request to the "
            "REST API of that node"
        )
    filters = {"ids": [str(volume_id) for volume_id in ids]} if ids else {}
    records = await control.call("volume.list", filters)
    return web.json_response(osd.bytes_used_to_osd(node_id, records))


@routes.get("/statslive")
async def stats_live(request: web.Request) -> web.Response:
    """Return the Stats of the last 2 seconds of I/O of the volume `volumeid` (Portworx)."""
    volume_id = _stats_query(request)
    stats = await _control(request).call("volume.stats_live", volume_id)
    return web.json_response(osd.stats_to_osd(stats))


@routes.get("/statshistory")
async def stats_history(request: web.Request) -> web.Response:
    """Return the hourly, daily and monthly I/O history of the volume `volumeid` (Portworx)."""
    volume_id = _stats_query(request)
    history = await _control(request).call("volume.stats_history", volume_id)
    return web.json_response(osd.history_to_osd(history))


@routes.get("/cluster/versions")
async def cluster_versions(request: web.Request) -> web.Response:
    """Return the versions of the cluster API that this server implements."""
    return web.json_response(["v1"])


@routes.get("/v1/cluster/enumerate")
async def cluster_enumerate(request: web.Request) -> web.Response:
    """Return the Cluster object: every node of the cluster as pxd reports it."""
    control = _control(request)
    nodes = await control.call("cluster.nodes")
    node_id = await _node_id(control)
    return web.json_response(osd.cluster_to_osd(nodes, node_id, time.time_ns()))


@routes.get("/v1/cluster/inspect/{node_id}")
async def cluster_inspect(request: web.Request) -> web.Response:
    """Return the Node object of one node; an unknown node id is a 400, as in openstorage."""
    node_id = request.match_info["node_id"]
    nodes = await _control(request).call("cluster.nodes")
    for node in nodes:
        if str(node.get("node_id")) == node_id:
            return web.json_response(osd.node_to_osd(node, time.time_ns()))
    raise errors.InvalidArgument(f"node {node_id} not found in the cluster")


@routes.get("/v1/cluster/status")
async def cluster_status(request: web.Request) -> web.Response:
    """Return the cluster's api.Status, a bare integer: that of the node serving the request."""
    return web.json_response(await _own_status(_control(request)))


@routes.get("/v1/cluster/nodestatus")
async def cluster_node_status(request: web.Request) -> web.Response:
    """Return the api.Status of the node that serves the request, a bare integer."""
    return web.json_response(await _own_status(_control(request)))


@routes.get("/v1/cluster/nodehealth")
async def cluster_node_health(request: web.Request) -> web.Response:
    """Return the api.Status of the node that serves the request, as its health."""
    # pxd has no health checks apart from its status, so health and status are the same.
    return web.json_response(await _own_status(_control(request)))


@routes.get("/v1/cluster/getnodeidfromip/{idip}")
async def cluster_node_id_from_ip(request: web.Request) -> web.Response:
    """Return, as a JSON string, the id of the node with IP `idip`; a node id is returned as is."""
    nodes = await _control(request).call("cluster.nodes")
    return web.json_response(osd.node_id_from_ip(nodes, request.match_info["idip"]))


async def _own_status(control: ControlClient) -> int:
    nodes = await control.call("cluster.nodes")
    return osd.cluster_status_code(nodes, await _node_id(control))


def _control(request: web.Request) -> ControlClient:
    return request.app[CONTROL]


async def _node_id(control: ControlClient) -> str:
    status = await control.call("node.status")
    return str(status["node_id"])


async def _inspect(control: ControlClient, ref: str) -> dict[str, Any] | None:
    """Return the OSD JSON of volume `ref`, or None when it does not exist."""
    try:
        record = await control.call("volume.inspect", ref)
    except errors.NotFound:
        return None
    return osd.volume_to_osd(record, await _node_id(control))


async def _update_volume(control: ControlClient, ref: str, update: osdrequests.SetRequest) -> None:
    """Apply the spec and locator keys of a PUT; a failure is a hard error, as in openstorage."""
    osdrequests.check_set_request(update, await control.call("volume.inspect", ref))
    changes = update.changes()
    if not changes:
        return
    await control.call("volume.update", ref, changes)
    log.info("updated volume %s: %s", ref, ", ".join(sorted(changes)))


def _bool_query(request: web.Request, key: str, *, default: bool) -> bool:
    """Parse a query parameter that must be true or false, in any case."""
    values = request.query.getall(key, [])
    if not values:
        return default
    if len(values) > 1:
        raise errors.InvalidArgument(f"query parameter {key} is given {len(values)} times")
    value = values[0].lower()
    if value not in ("true", "false"):
        raise errors.InvalidArgument(
            f"query parameter {key} must be true or false, got {values[0]!r}"
        )
    return value == "true"


def _stats_query(request: web.Request) -> str:
    """Return the `volumeid` of a statslive or statshistory request, checking `stattype`."""
    volume_id = _single_query(request, "volumeid")
    if not (volume_id.isascii() and volume_id.isdigit()):
        raise errors.InvalidArgument(
            f"query parameter volumeid must be a volume id (decimal digits), got {volume_id!r}; "
            "GET /v1/osd-volumes/NAME returns the id of a volume"
        )
    stat_type = _single_query(request, "stattype")
    if stat_type != STAT_TYPE_VOLUME:
        raise errors.InvalidArgument(
            f"query parameter stattype must be {STAT_TYPE_VOLUME}, got {stat_type!r}"
        )
    return volume_id


def _single_query(request: web.Request, key: str) -> str:
    values = request.query.getall(key, [])
    if not values or not values[0]:
        raise errors.InvalidArgument(f"query parameter {key} is missing")
    if len(values) > 1:
        raise errors.InvalidArgument(f"query parameter {key} is given {len(values)} times")
    return values[0]


async def _apply_attach(control: ControlClient, ref: str, update: osdrequests.SetRequest) -> str:
    if update.attach == osd.ACTION_ON:
        return await _soft(control.call("volume.attach", ref))
    if update.attach != osd.ACTION_OFF:
        return ""
    if update.options.get("UNMOUNT_BEFORE_DETACH", "").lower() == "true":
        error = await _unmount_all(control, ref)
        if error:
            return error
    return await _soft(control.call("volume.detach", ref))


async def _apply_mount(control: ControlClient, ref: str, update: osdrequests.SetRequest) -> str:
    if update.mount == osd.ACTION_NONE:
        return ""
    if not update.mount_path:
        return "Invalid mount path"
    method = "volume.mount" if update.mount == osd.ACTION_ON else "volume.unmount"
    return await _soft(control.call(method, ref, update.mount_path))


async def _unmount_all(control: ControlClient, ref: str) -> str:
    """Unmount every path of volume `ref`; return the first error message, or ""."""
    try:
        record = await control.call("volume.inspect", ref)
    except errors.NotFound as exc:
        return exc.message
    for path in record.get("mounted") or record.get("mount_paths") or []:
        error = await _soft(control.call("volume.unmount", ref, path))
        if error:
            return error
    return ""


async def _soft(call: Awaitable[Any]) -> str:
    """Await a control call and return its error message, or "" when it succeeded."""
    try:
        await call
    except _HARD_ERRORS:
        raise
    except errors.PxfsError as exc:
        log.info("volume operation failed: %s", exc.message)
        return exc.message
    return ""


def _is_release(update: osdrequests.SetRequest) -> bool:
    """True when the request detaches or unmounts and attaches or mounts nothing."""
    actions = {update.attach, update.mount}
    return osd.ACTION_OFF in actions and osd.ACTION_ON not in actions
