"""Checks what a schema cannot: that the manifests in deploy/kubernetes/ refer to each
other correctly, agree with ws_echo's own timings, and agree with the image the
Dockerfile builds (user, port, signal).

Run by .ci/validate-deploy.sh with the validator's Python (it brings PyYAML):
    python check-deploy-refs.py deploy/kubernetes Dockerfile
Prints one line per failed check and exits 1 if there is any.
"""

import pathlib
import re
import sys

import yaml

# ws_echo's --ping-interval default (src/config.rs): proxies must wait longer than this.
PING_INTERVAL_S = 30


def seconds(duration: str) -> float:
    """A humantime duration as ws_echo accepts it, limited to the units we use."""
    match = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    if not match:
        raise ValueError(f"unsupported duration {duration!r}")
    value, unit = int(match[1]), match[2]
    return {"ms": value / 1000, "s": value, "m": value * 60}[unit]


def dockerfile_instructions(path: pathlib.Path) -> list:
    """(INSTRUCTION, arguments) of the last stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            if word.upper() == "FROM":
                instructions = []
            instructions.append((word.upper(), rest.strip()))
    return instructions


def main(directory: str, dockerfile: str) -> int:
    root = pathlib.Path(directory)
    failures = []

    def check(condition: bool, message: str) -> None:
        if not condition:
            failures.append(message)

    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    manifests = sorted(p.name for p in root.glob("*.yaml") if p.name != "kustomization.yaml")
    check(
        kustomization.get("kind") == "Kustomization"
        and kustomization.get("apiVersion") == "kustomize.config.k8s.io/v1beta1",
        "kustomization.yaml: not a kustomize.config.k8s.io/v1beta1 Kustomization",
    )
    check(
        sorted(kustomization.get("resources", [])) == manifests,
        f"kustomization.yaml: resources {kustomization.get('resources')} "
        f"are not exactly the manifests here {manifests}",
    )

    objects = {}
    for name in manifests:
        for doc in yaml.safe_load_all((root / name).read_text()):
            if doc:
                objects[(doc["kind"], doc["metadata"]["name"])] = doc

    deployment = objects.get(("Deployment", "ws-echo"))
    if deployment is None:
        print("no Deployment ws-echo")
        return 1
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    container = pod["containers"][0]
    port_names = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    env = {e["name"]: e for e in container.get("env", [])}

    def selects_pods(selector: dict, what: str) -> None:
        check(
            selector.items() <= pod_labels.items(),
            f"{what}: selector {selector} does not match the pod labels {pod_labels}",
        )

    selects_pods(spec["selector"]["matchLabels"], "Deployment")
    check("replicas" not in spec, "Deployment: replicas is set, but the HPA owns it")

    # Probes and the listen address agree with the named port.
    listen_port = int(env["WS_ECHO_LISTEN"]["value"].rsplit(":", 1)[1])
    check(port_names.get("http") == listen_port,
          f"Deployment: port http is not WS_ECHO_LISTEN's {listen_port}")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        check(get["path"] == path, f"Deployment: {probe} is not on {path}")
        check(get["port"] in port_names, f"Deployment: {probe} port {get['port']} is not named")

    # The pod name reaches X-Served-By, logs are JSON.
    field = env.get("WS_ECHO_INSTANCE_NAME", {}).get("valueFrom", {}).get("fieldRef", {})
    check(field.get("fieldPath") == "metadata.name",
          "Deployment: WS_ECHO_INSTANCE_NAME does not come from metadata.name")
    check(container.get("args", [])[:2] == ["--log-format", "json"],
          "Deployment: --log-format json is not set")

    # The drain fits in the grace period, after the preStop delay.
    drain = seconds(env["WS_ECHO_SHUTDOWN_TIMEOUT"]["value"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod["terminationGracePeriodSeconds"]
    check(pre_stop + drain + 5 <= grace,
          f"Deployment: preStop {pre_stop}s + drain {drain}s + 5s margin exceed the "
          f"{grace}s grace period")

    security = container["securityContext"]
    check(pod["securityContext"].get("runAsNonRoot") is True, "Deployment: runAsNonRoot")
    check(security.get("readOnlyRootFilesystem") is True, "Deployment: readOnlyRootFilesystem")
    check(security.get("allowPrivilegeEscalation") is False, "Deployment: allowPrivilegeEscalation")
    for kind in ("requests", "limits"):
        check({"cpu", "memory"} <= container.get("resources", {}).get(kind, {}).keys(),
              f"Deployment: resources.{kind} needs cpu and memory")

    service = objects.get(("Service", "ws-echo"))
    check(service is not None, "no Service ws-echo")
    if service:
        selects_pods(service["spec"]["selector"], "Service")
        for port in service["spec"]["ports"]:
            check(port["targetPort"] in port_names or port["targetPort"] in port_names.values(),
                  f"Service: targetPort {port['targetPort']} is not a container port")
        service_ports = {p.get("name") for p in service["spec"]["ports"]} | {
            p["port"] for p in service["spec"]["ports"]
        }

    hpa = objects.get(("HorizontalPodAutoscaler", "ws-echo"))
    check(hpa is not None, "no HorizontalPodAutoscaler ws-echo")
    if hpa:
        target = hpa["spec"]["scaleTargetRef"]
        check((target["kind"], target["name"]) == ("Deployment", "ws-echo"),
              f"HPA: scales {target}, not the Deployment")
        check(hpa["spec"].get("minReplicas", 1) >= 2, "HPA: minReplicas below 2")
        check(any(m.get("resource", {}).get("name") == "cpu" for m in hpa["spec"]["metrics"]),
              "HPA: no CPU metric")

    pdb = objects.get(("PodDisruptionBudget", "ws-echo"))
    if pdb:
        selects_pods(pdb["spec"]["selector"]["matchLabels"], "PodDisruptionBudget")

    ingress = objects.get(("Ingress", "ws-echo"))
    check(ingress is not None, "no Ingress ws-echo")
    if ingress and service:
        annotations = ingress["metadata"].get("annotations", {})
        for name in ("proxy-read-timeout", "proxy-send-timeout"):
            value = annotations.get(f"nginx.ingress.kubernetes.io/{name}")
            check(value is not None and int(value) > PING_INTERVAL_S,
                  f"Ingress: {name} {value} is not above the {PING_INTERVAL_S}s ping interval")
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                check(backend["name"] == service["metadata"]["name"],
                      f"Ingress: backend {backend['name']} is not the Service")
                port = backend["port"].get("name", backend["port"].get("number"))
                check(port in service_ports, f"Ingress: backend port {port} is not on the Service")

    # The image: what the Deployment assumes about it.
    image = dockerfile_instructions(pathlib.Path(dockerfile))
    users = [rest for word, rest in image if word == "USER"]
    user = users[-1].split(":")[0] if users else "root"
    check(user.isdigit() and int(user) != 0,
          f"Dockerfile: the runtime stage runs as {user!r}, not a numeric non-root id")
    check(user == str(pod["securityContext"].get("runAsUser")),
          f"Dockerfile: USER {user} is not the Deployment's runAsUser")
    check(("EXPOSE", str(listen_port)) in image, f"Dockerfile: EXPOSE {listen_port} missing")
    check(("ENV", f"WS_ECHO_LISTEN=0.0.0.0:{listen_port}") in image,
          f"Dockerfile: ENV WS_ECHO_LISTEN=0.0.0.0:{listen_port} missing")
    check(("STOPSIGNAL", "SIGTERM") in image, "Dockerfile: STOPSIGNAL SIGTERM missing")
    check(any(word == "HEALTHCHECK" and "/healthz" in rest for word, rest in image),
          "Dockerfile: no HEALTHCHECK on /healthz")
    check("cargo build --release --locked" in pathlib.Path(dockerfile).read_text(),
          "Dockerfile: the build is not `cargo build --release --locked`")

    for failure in failures:
        print(f"ERROR {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
