package dev.recgw.client;

import io.grpc.Attributes;
import io.grpc.EquivalentAddressGroup;
import io.grpc.NameResolver;
import io.grpc.NameResolverProvider;
import io.grpc.NameResolverRegistry;
import io.grpc.StatusOr;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.URI;
import java.net.URISyntaxException;
import java.net.UnknownHostException;
import java.util.ArrayList;
import java.util.List;
import java.util.regex.Pattern;

/**
 * Several gateway replicas as one gRPC target: a name resolver for a static list of IP:port
 * addresses (grpc-java has none built in; C-core's {@code ipv4:a,b} scheme is C-core only), which
 * the channel balances over with round_robin.
 */
final class Replicas {
  static final String SCHEME = "recgw-replicas";

  private static final Pattern IPV4 = Pattern.compile("(25[0-5]|2[0-4]\\d|1\\d\\d|[1-9]?\\d)(\\.(25[0-5]|2[0-4]\\d|1\\d\\d|[1-9]?\\d)){3}");
  private static final Pattern IPV6 = Pattern.compile("[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*");
  private static final Pattern PORT = Pattern.compile("\\d{1,5}");

  private static volatile boolean registered;

  private Replicas() {}

  /**
   * The addresses of {@code address} separated by commas, trimmed; refuses empty entries.
   */
  static List<String> split(String address) {
    List<String> parts = new ArrayList<>();
    for (String part : address.split(",", -1)) {
      parts.add(part.strip());
    }
    return checkNotEmpty(parts);
  }

  static List<String> checkNotEmpty(List<String> addresses) {
    if (addresses.isEmpty()) {
      throw new IllegalArgumentException("no gateway address given");
    }
    for (String address : addresses) {
      if (address == null || address.isBlank()) {
        throw new IllegalArgumentException("an empty gateway address in the list of addresses");
      }
    }
    return addresses;
  }

  /**
   * The socket address of one replica, {@code 10.0.0.11:50051} or {@code [fd00::11]:50051}; names
   * are refused (no DNS lookup happens here).
   */
  static InetSocketAddress parse(String address) {
    int colon = address.lastIndexOf(':');
    String host = colon < 0 ? "" : address.substring(0, colon);
    String port = colon < 0 ? "" : address.substring(colon + 1);
    boolean ipv6 = host.startsWith("[") && host.endsWith("]") && IPV6.matcher(host.substring(1, host.length() - 1)).matches();
    if (!(ipv6 || IPV4.matcher(host).matches()) || !PORT.matcher(port).matches() || Integer.parseInt(port) > 65535) {
      throw new IllegalArgumentException(
          "several gateway addresses must each be IP:port (" + quote(address) + " is not); for names, "
              + "give one DNS name that resolves to every replica (dns:///recgw.internal:50051)");
    }
    try {
      // A literal (checked above): getByName parses it without a lookup.
      InetAddress ip = InetAddress.getByName(ipv6 ? host.substring(1, host.length() - 1) : host);
      return new InetSocketAddress(ip, Integer.parseInt(port));
    } catch (UnknownHostException e) {
      throw new IllegalArgumentException("not an IP address: " + quote(address), e);
    }
  }

  /** The channel target naming these replicas; their addresses are checked first. */
  static String target(List<String> addresses) {
    for (String address : addresses) {
      parse(address);
    }
    register();
    try {
      // The multi-argument constructor quotes what a URI path may not hold (IPv6 brackets).
      return new URI(SCHEME, "", "/" + String.join(",", addresses), null).toString();
    } catch (URISyntaxException e) {
      throw new IllegalArgumentException("cannot make a target of the gateway addresses", e);
    }
  }

  private static synchronized void register() {
    if (!registered) {
      NameResolverRegistry.getDefaultRegistry().register(new Provider());
      registered = true;
    }
  }

  /** {@code text} in double quotes, with quotes, backslashes and control characters escaped. */
  static String quote(String text) {
    StringBuilder out = new StringBuilder("\"");
    for (char c : text.toCharArray()) {
      if (c == '"' || c == '\\') {
        out.append('\\').append(c);
      } else if (c < 0x20 || c > 0x7e) {
        out.append(String.format("\\u%04x", (int) c));
      } else {
        out.append(c);
      }
    }
    return out.append('"').toString();
  }

  /** Resolves {@code recgw-replicas:///a,b} to the addresses a and b, each its own group. */
  static final class Provider extends NameResolverProvider {
    @Override
    protected boolean isAvailable() {
      return true;
    }

    @Override
    protected int priority() {
      return 5;
    }

    @Override
    public String getDefaultScheme() {
      return SCHEME;
    }

    @Override
    public NameResolver newNameResolver(URI target, NameResolver.Args args) {
      if (!SCHEME.equals(target.getScheme())) {
        return null;
      }
      List<String> addresses = List.of(target.getPath().substring(1).split(","));
      List<EquivalentAddressGroup> groups = new ArrayList<>();
      for (String address : addresses) {
        groups.add(new EquivalentAddressGroup(parse(address)));
      }
      return new Resolver(addresses.get(0), groups);
    }
  }

  private static final class Resolver extends NameResolver {
    private final String authority;
    private final List<EquivalentAddressGroup> groups;

    Resolver(String authority, List<EquivalentAddressGroup> groups) {
      this.authority = authority;
      this.groups = groups;
    }

    @Override
    public String getServiceAuthority() {
      return authority;
    }

    @Override
    public void start(Listener2 listener) {
      listener.onResult(ResolutionResult.newBuilder()
          .setAddressesOrError(StatusOr.fromValue(groups)).setAttributes(Attributes.EMPTY).build());
    }

    @Override
    public void shutdown() {}
  }
}
