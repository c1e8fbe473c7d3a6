// The agent end of Cilium's standalone DNS proxy (a peer of benches/peers, not part of the
// product): serves the FQDNData gRPC stream from Cilium's generated API. Cilium's `replace`
// lines are copied from its go.mod, as a dependent module must.
module fqdnguard.dev/tools/peers/cilium-sdp-agent

go 1.26.0

require (
	github.com/cilium/cilium v1.19.0
	google.golang.org/grpc v1.78.0
)

require (
	golang.org/x/net v0.48.0 // indirect
	golang.org/x/sys v0.40.0 // indirect
	golang.org/x/text v0.33.0 // indirect
	google.golang.org/genproto/googleapis/rpc v0.0.0-20251222181119-0a764e51fe1b // indirect
	google.golang.org/protobuf v1.36.11 // indirect
)

replace sigs.k8s.io/controller-tools => github.com/cilium/controller-tools v0.16.5-1

replace github.com/osrg/gobgp/v3 => github.com/cilium/gobgp/v3 v3.0.0-20260130142103-27e5da2a39e6
